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
from typing import Callable, Iterator, Protocol

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


class LabelSource(Protocol):
    """Where `fit` gets labels: `labels_for(block_ids)` → int64 [len(block_ids), L].

    A tensor of labels is one (`TensorLabels`); the distributed engine's stream from the labelers is another.
    `fit` asks in the order `Schedule.requests` gives, so a producer can make them ahead of time.
    """

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor: ...

    def scalars(self) -> dict[str, float]:
        """Observability of the last call (queue depth, producer throughput); logged per step."""
        ...


class TensorLabels:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor:
        return self.labels[block_ids]

    def scalars(self) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class Schedule:
    """Which blocks each rank trains on at each step: a pure function of (block count, config, world size).

    The validation split and every epoch's order are seeded by `cfg.seed`; each step takes the next
    `per_step` blocks and cuts them into one contiguous share per rank, so the global order does not depend
    on the world size and N ranks × micro-batch b train like 1 rank × N·b. Because it is pure, a resumed
    run and the labelers recompute it instead of storing it.
    """

    train_ids: torch.Tensor  # block ids of the training split
    val_ids: torch.Tensor  # block ids held out for validation
    local_blocks: int  # blocks per rank per step
    world_size: int
    total_steps: int
    steps_per_epoch: int
    seed: int

    @classmethod
    def make(cls, n_blocks: int, cfg: TrainConfig, world_size: int) -> Schedule:
        n_val = 0 if cfg.val_fraction == 0 or n_blocks < 2 else max(1, round(n_blocks * cfg.val_fraction))
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed))
        local_blocks = cfg.micro_batch_size * cfg.grad_accum
        steps_per_epoch = max(1, math.ceil((n_blocks - n_val) / (local_blocks * world_size)))
        total_steps = math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        return cls(order[n_val:], order[:n_val], local_blocks, world_size, total_steps, steps_per_epoch, cfg.seed)

    @property
    def val_share_size(self) -> int:
        return math.ceil(self.val_ids.numel() / self.world_size)

    def val_share(self, rank: int) -> torch.Tensor:
        """This rank's contiguous share of the validation blocks (the last ranks' may be short)."""
        size = self.val_share_size
        return self.val_ids[rank * size : (rank + 1) * size]

    def steps(self, first_step: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(step, the step's block ids over all ranks) from `first_step` on; epochs reshuffle and carry over."""
        per_step = self.local_blocks * self.world_size
        n_train = self.train_ids.numel()
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.empty(0, dtype=torch.long)
        for step in range(self.total_steps):
            while order.numel() < per_step:
                order = torch.cat([order, torch.randperm(n_train, generator=generator)])
            chosen, order = order[:per_step], order[per_step:]
            if step >= first_step:
                yield step, self.train_ids[chosen]

    def share(self, step_ids: torch.Tensor, rank: int) -> torch.Tensor:
        return step_ids[rank * self.local_blocks : (rank + 1) * self.local_blocks]

    def requests(self, first_step: int = 0) -> Iterator[list[torch.Tensor]]:
        """Per rank, the block ids `fit` asks labels for, in order: the validation share, then each step's share."""
        yield [self.val_share(rank) for rank in range(self.world_size)]
        for _, step_ids in self.steps(first_step):
            yield [self.share(step_ids, rank) for rank in range(self.world_size)]


def pad_blocks(input_ids: torch.Tensor, labels: torch.Tensor, size: int) -> MicroBatch:
    """Pad with fully ignored blocks to `size`: under ZeRO-3 a rank with one forward call fewer deadlocks the others."""
    pad = size - input_ids.shape[0]
    return torch.cat([input_ids, input_ids.new_zeros(pad, input_ids.shape[1])]), torch.cat([labels, labels.new_full((pad, labels.shape[1]), IGNORE_INDEX)])


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
    label_wait_seconds: float = 0.0  # spent waiting for training labels (a streamed source's queue)
    tokens: int = 0  # trained (non-ignored) tokens over all ranks


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint `root/latest` names, if any."""
    pointer = Path(root) / "latest"
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


def latest_step(root: Path) -> int:
    """The step `fit(resume=True)` continues from: that of the latest complete checkpoint, else 0."""
    path = latest_checkpoint(root)
    return int(path.name.removeprefix("step-")) if path is not None else 0


class Checkpoints:
    """`root/step-K/` directories; one is complete only once `root/latest` names it.

    Every rank writes into `step-K.partial/`, then rank 0 renames it and atomically repoints `latest`: a
    crash at any moment leaves `latest` naming a complete checkpoint (or nothing). Other directories are
    leftovers of crashes and are never loaded; the last two checkpoints are kept.
    """

    def __init__(self, root: Path, backend: TrainBackend):
        self.root, self.backend = Path(root), backend

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

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
    labels: torch.Tensor | LabelSource,
    cfg: TrainConfig,
    save_to: Path | None = None,
    keep_best: bool = True,
    writer=None,
    desc: str = "train",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop=None,
    progress: Callable[[int, int, float], None] | None = None,
) -> FitResult:
    """Train on [B, L] blocks; validate on a held-out split and save the best (or last) weights.

    `labels` is a [B, L] tensor or a `LabelSource` asked in `Schedule.requests` order. With `keep_best` and
    a validation split, `save_to` receives the weights with the lowest validation loss (the paper's script
    keeps the best checkpoint on the generic labels); otherwise it receives the final weights.

    Every rank calls it with the same data and trains on its share of each step (`Schedule`). A checkpoint
    (every `checkpoint_every` steps into `checkpoint_dir`, and when `stop.is_set()` on any rank, which then
    returns early) holds the step and RNG, so `resume` ends with the same weights as an uninterrupted run.
    `progress(step, total_steps, loss)` is called on rank 0 after each step, in place of the progress bar.
    """
    rank, world_size = backend.rank, backend.world_size
    labels_for = TensorLabels(labels) if isinstance(labels, torch.Tensor) else labels
    schedule = Schedule.make(input_ids.shape[0], cfg, world_size)
    total_steps = schedule.total_steps
    eval_every = cfg.eval_every or schedule.steps_per_epoch
    validate = keep_best and schedule.val_ids.numel() > 0
    writer = writer if rank == 0 else None
    checkpoints = Checkpoints(checkpoint_dir, backend) if checkpoint_dir is not None else None
    if resume and checkpoints is None:
        raise ValueError("resume needs a checkpoint_dir")
    result, first_step = FitResult(), 0
    state = checkpoints.load() if resume else None
    if state is not None:
        first_step, result = state["step"], FitResult(**state["result"])
    elif resume:
        log.info("%s: no checkpoint in %s, starting fresh", desc, checkpoint_dir)
    start = time.perf_counter() - result.seconds
    my_val = schedule.val_share(rank)
    my_val_ids, my_val_labels = pad_blocks(input_ids[my_val], labels_for(my_val), schedule.val_share_size)

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
    bar = tqdm(total=total_steps, initial=first_step, desc=desc, unit="step", dynamic_ncols=True, disable=rank != 0 or progress is not None)
    for step, step_ids in schedule.steps(first_step):
        chosen = schedule.share(step_ids, rank)
        t_wait = time.perf_counter()
        chosen_labels = labels_for(chosen)
        t0 = time.perf_counter()
        result.label_wait_seconds += t0 - t_wait
        micro = [(input_ids[chosen[i : i + cfg.micro_batch_size]], chosen_labels[i : i + cfg.micro_batch_size]) for i in range(0, chosen.numel(), cfg.micro_batch_size)]
        lr = lr_at(step, total_steps, cfg)
        stats = backend.train_step(micro, lr)
        result.losses.append(stats.loss)
        result.steps, result.tokens = step + 1, result.tokens + stats.tokens
        if writer is not None:
            writer.add_scalar(f"{desc}/loss", stats.loss, step + 1)
            writer.add_scalar(f"{desc}/lr", lr, step + 1)
            writer.add_scalar(f"{desc}/grad_norm", stats.grad_norm, step + 1)
            writer.add_scalar(f"{desc}/tokens_per_s", stats.tokens / max(time.perf_counter() - t0, 1e-9), step + 1)
            writer.add_scalar(f"{desc}/label_wait_s", t0 - t_wait, step + 1)
            for name, value in labels_for.scalars().items():
                writer.add_scalar(f"{desc}/{name}", value, step + 1)
        if progress is not None and rank == 0:
            progress(step + 1, total_steps, stats.loss)
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        bar.update()
        if validate and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
            run_validation(step + 1)
        stopping = step + 1 < total_steps and stop is not None and backend.all_reduce(float(stop.is_set()))[0] > 0
        if checkpoints is not None and (stopping or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            result.seconds = time.perf_counter() - start
            checkpoints.save(step + 1, {"step": step + 1, "result": asdict(result)})
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
