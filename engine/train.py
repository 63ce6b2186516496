"""The training loop shared by every phase (pretrain, reinforce, unlearn).

A phase is "cross-entropy on (input_ids, labels) blocks", labels in the Hugging Face causal-LM
convention (`labels[t]` is the target of the output at `t - 1`, -100 = ignored). Reinforce uses
`labels = input_ids`; unlearn uses the shifted generic labels. The loop only talks to a
`TrainBackend`, so the single-process PyTorch backend here and the DeepSpeed ZeRO-3 backend of the
distributed engine run the very same loop.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from configs import TrainConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (input_ids [b, L], labels [b, L])


@dataclass
class StepStats:
    loss: float  # token-weighted mean cross-entropy over the whole optimizer step
    grad_norm: float
    tokens: int  # trained (non-ignored) tokens


class TrainBackend(Protocol):
    """What the loop needs from an engine. One call of `train_step` is one optimizer update."""

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepStats: ...

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """(summed cross-entropy, number of non-ignored tokens) without gradients."""
        ...

    def save(self, path: Path) -> None:
        """Write the current weights as a Hugging Face safetensors directory."""
        ...


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy in the HF convention, and the number of counted tokens."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


class TorchBackend:
    """Single-process training: AdamW on fp32 master weights, bf16 autocast on GPU when asked."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, save_fn: Callable[[torch.nn.Module, Path], None], autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.cfg = cfg
        self.save_fn = save_fn
        self.autocast_dtype = autocast_dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            return self.model(input_ids=input_ids.to(self.device)).logits

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepStats:
        self.model.train()
        total_tokens = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in micro_batches)
        loss_sum = 0.0
        for input_ids, labels in micro_batches:
            loss, _ = causal_lm_loss_sum(self._logits(input_ids), labels.to(self.device))
            (loss / max(total_tokens, 1)).backward()
            loss_sum += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss=loss_sum / max(total_tokens, 1), grad_norm=float(grad_norm), tokens=total_tokens)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        self.model.eval()
        loss, count = causal_lm_loss_sum(self._logits(input_ids), labels.to(self.device))
        return float(loss), count

    def save(self, path: Path) -> None:
        self.save_fn(self.model, path)


def split_train_val(input_ids: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int):
    """Seeded block-level split; at least one validation block when a fraction is asked for."""
    n = input_ids.shape[0]
    n_val = 0 if val_fraction == 0 or n < 2 else max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return (input_ids[train], labels[train]), (input_ids[val], labels[val])


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class FitResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int = -1
    best_val_loss: float = float("inf")
    seconds: float = 0.0


def fit(
    backend: TrainBackend,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    save_to: Path | None = None,
    keep_best: bool = True,
    writer=None,
    desc: str = "train",
) -> FitResult:
    """Train on [B, L] blocks; validate on a held-out split and save the best (or last) weights.

    With `keep_best` and a validation split, `save_to` receives the weights with the lowest
    validation loss (the paper's script keeps the best checkpoint on the generic labels);
    otherwise it receives the final weights.
    """
    (train_ids, train_labels), (val_ids, val_labels) = split_train_val(input_ids, labels, cfg.val_fraction, cfg.seed)
    n_train = train_ids.shape[0]
    per_step = cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    validate = keep_best and val_ids.shape[0] > 0
    result = FitResult()
    start = time.perf_counter()

    def run_validation(step: int) -> None:
        loss_sum, count = 0.0, 0
        for i in range(0, val_ids.shape[0], cfg.micro_batch_size):
            s, c = backend.eval_loss(val_ids[i : i + cfg.micro_batch_size], val_labels[i : i + cfg.micro_batch_size])
            loss_sum, count = loss_sum + s, count + c
        val_loss = loss_sum / max(count, 1)
        result.val_losses.append((step, val_loss))
        if writer is not None:
            writer.add_scalar(f"{desc}/val_loss", val_loss, step)
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_step = val_loss, step
            if save_to is not None:
                backend.save(save_to)
        log.info("%s step %d: val loss %.4f (best %.4f at step %d)", desc, step, val_loss, result.best_val_loss, result.best_step)

    if validate:
        run_validation(0)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)
    for step in range(total_steps):
        while order.numel() < per_step:  # new epoch: reshuffle, keep the remainder of the last one
            order = torch.cat([order, torch.randperm(n_train, generator=generator)])
        chosen, order = order[:per_step], order[per_step:]
        micro = [(train_ids[chosen[i : i + cfg.micro_batch_size]], train_labels[chosen[i : i + cfg.micro_batch_size]]) for i in range(0, per_step, cfg.micro_batch_size)]
        lr = lr_at(step, total_steps, cfg)
        t0 = time.perf_counter()
        stats = backend.train_step(micro, lr)
        result.losses.append(stats.loss)
        result.steps = step + 1
        if writer is not None:
            writer.add_scalar(f"{desc}/loss", stats.loss, step + 1)
            writer.add_scalar(f"{desc}/lr", lr, step + 1)
            writer.add_scalar(f"{desc}/grad_norm", stats.grad_norm, step + 1)
            writer.add_scalar(f"{desc}/tokens_per_s", stats.tokens / max(time.perf_counter() - t0, 1e-9), step + 1)
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        bar.update()
        if validate and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
            run_validation(step + 1)
    bar.close()
    if not validate and save_to is not None:
        backend.save(save_to)
    result.seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.1fs, final loss %.4f", desc, result.steps, result.seconds, result.losses[-1] if result.losses else float("nan"))
    return result
