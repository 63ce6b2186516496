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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
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
    """What the loop needs from an engine. One call of `train_step` is one optimizer update.

    Every rank of a distributed backend runs `fit` and must make the same sequence of calls.
    """

    rank: int
    world_size: int

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepStats: ...

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """(summed cross-entropy, number of non-ignored tokens) without gradients."""
        ...

    def save(self, path: Path) -> None:
        """Write the current weights as a Hugging Face safetensors directory."""
        ...

    def save_state(self, directory: Path) -> None:
        """Write this rank's weights and optimizer state into an existing directory (for resuming)."""
        ...

    def load_state(self, directory: Path) -> None: ...

    def all_reduce(self, *values: float) -> list[float]:
        """Sums over ranks."""
        ...

    def barrier(self) -> None: ...


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy in the HF convention, and the number of counted tokens."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


class TorchBackend:
    """Single-process training: AdamW on fp32 master weights, bf16 autocast on GPU when asked."""

    rank, world_size = 0, 1

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

    def save_state(self, directory: Path) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / "backend.pt")

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / "backend.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def all_reduce(self, *values: float) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass


def split_train_val(input_ids: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int):
    """Seeded block-level split; at least one validation block when a fraction is asked for."""
    n = input_ids.shape[0]
    n_val = 0 if val_fraction == 0 or n < 2 else max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return (input_ids[train], labels[train]), (input_ids[val], labels[val])


def shard_padded(input_ids: torch.Tensor, labels: torch.Tensor, rank: int, world_size: int) -> MicroBatch:
    """This rank's contiguous share of the blocks, padded with fully ignored blocks: every rank gets as many
    (under ZeRO-3 a rank with one forward call fewer deadlocks the others)."""
    share = math.ceil(input_ids.shape[0] / world_size)
    ids, lab = input_ids[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]
    pad = share - ids.shape[0]
    return torch.cat([ids, ids.new_zeros(pad, ids.shape[1])]), torch.cat([lab, lab.new_full((pad, lab.shape[1]), IGNORE_INDEX)])


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
    interrupted: bool = False  # stopped early by the `stop` flag, after checkpointing


class Checkpoints:
    """`root/step-K/` directories; one is complete only once `root/latest` names it.

    Every rank writes into `step-K.partial/`, then rank 0 renames it and atomically repoints `latest`: a
    crash at any moment leaves `latest` naming a complete checkpoint (or nothing). Other directories are
    leftovers of crashes and are never loaded; the last two checkpoints are kept.
    """

    def __init__(self, root: Path, backend: TrainBackend):
        self.root, self.backend = Path(root), backend

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    def save(self, step: int, loop_state: dict) -> None:
        backend = self.backend
        partial, final = self.root / f"step-{step}.partial", self.root / f"step-{step}"
        if backend.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        backend.barrier()
        backend.save_state(partial)
        torch.save({**loop_state, "rng": torch.get_rng_state()}, partial / f"loop-{backend.rank}.pt")
        backend.barrier()
        if backend.rank == 0:
            previous = self.latest()
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / "latest")
            for old in self.root.glob("step-*"):
                if old not in (final, previous):
                    shutil.rmtree(old)
        backend.barrier()

    def load(self) -> dict | None:
        """Restore the backend and this rank's RNG from the latest checkpoint; return the loop state."""
        path = self.latest()
        if path is None:
            return None
        self.backend.load_state(path)
        state = torch.load(path / f"loop-{self.backend.rank}.pt", weights_only=True)
        torch.set_rng_state(state.pop("rng"))
        log.info("resuming from %s", path)
        return state


def fit(
    backend: TrainBackend,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    save_to: Path | None = None,
    keep_best: bool = True,
    writer=None,
    desc: str = "train",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop=None,
) -> FitResult:
    """Train on [B, L] blocks; validate on a held-out split and save the best (or last) weights.

    With `keep_best` and a validation split, `save_to` receives the weights with the lowest
    validation loss (the paper's script keeps the best checkpoint on the generic labels);
    otherwise it receives the final weights.

    Every rank calls it with the same data. The global order of blocks does not depend on the world
    size: each step's blocks are cut into one contiguous share per rank, so N ranks × micro-batch b
    train like 1 rank × N·b. A checkpoint (every `checkpoint_every` steps into `checkpoint_dir`, and
    when `stop.is_set()` on any rank, which then returns early) holds the data position and RNG too,
    so `resume` ends with the same weights as an uninterrupted run.
    """
    rank, world_size = backend.rank, backend.world_size
    (train_ids, train_labels), (val_ids, val_labels) = split_train_val(input_ids, labels, cfg.val_fraction, cfg.seed)
    n_train = train_ids.shape[0]
    local_blocks = cfg.micro_batch_size * cfg.grad_accum
    per_step = local_blocks * world_size
    steps_per_epoch = max(1, math.ceil(n_train / per_step))
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    validate = keep_best and val_ids.shape[0] > 0
    my_val_ids, my_val_labels = shard_padded(val_ids, val_labels, rank, world_size)
    writer = writer if rank == 0 else None
    checkpoints = Checkpoints(checkpoint_dir, backend) if checkpoint_dir is not None else None
    if resume and checkpoints is None:
        raise ValueError("resume needs a checkpoint_dir")
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    result, first_step = FitResult(), 0
    state = checkpoints.load() if resume else None
    if state is not None:
        first_step, order, result = state["step"], state["order"], FitResult(**state["result"])
        generator.set_state(state["generator"])
    elif resume:
        log.info("%s: no checkpoint in %s, starting fresh", desc, checkpoint_dir)
    start = time.perf_counter() - result.seconds

    def run_validation(step: int) -> None:
        loss_sum, count = 0.0, 0
        for i in range(0, my_val_ids.shape[0], cfg.micro_batch_size):
            s, c = backend.eval_loss(my_val_ids[i : i + cfg.micro_batch_size], my_val_labels[i : i + cfg.micro_batch_size])
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

    if validate and first_step == 0:
        run_validation(0)
    bar = tqdm(total=total_steps, initial=first_step, desc=desc, unit="step", dynamic_ncols=True, disable=rank != 0)
    for step in range(first_step, total_steps):
        while order.numel() < per_step:  # new epoch: reshuffle, keep the remainder of the last one
            order = torch.cat([order, torch.randperm(n_train, generator=generator)])
        chosen, order = order[rank * local_blocks : (rank + 1) * local_blocks], order[per_step:]
        micro = [(train_ids[chosen[i : i + cfg.micro_batch_size]], train_labels[chosen[i : i + cfg.micro_batch_size]]) for i in range(0, local_blocks, cfg.micro_batch_size)]
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
        stopping = step + 1 < total_steps and stop is not None and backend.all_reduce(float(stop.is_set()))[0] > 0
        if checkpoints is not None and (stopping or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            result.seconds = time.perf_counter() - start
            checkpoints.save(step + 1, {"step": step + 1, "generator": generator.get_state(), "order": order, "result": asdict(result)})
        if stopping:
            result.interrupted = True
            log.info("%s: stopped at step %d", desc, step + 1)
            break
    bar.close()
    if not validate and save_to is not None and not result.interrupted:
        backend.save(save_to)
    result.seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.1fs, final loss %.4f", desc, result.steps, result.seconds, result.losses[-1] if result.losses else float("nan"))
    return result
