"""The training loop every phase of every method runs: `fit`, top to bottom.

A phase trains a model on blocks of the corpus toward per-block targets with the backend's objective. The
loop only talks to a `TrainBackend`, so the single-process PyTorch backend and the DeepSpeed ZeRO-3
backend of the distributed engine run the very same loop; targets come from a tensor or from a teacher's
stream (`TargetSource`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from configs import TrainConfig
from configs.errors import RunFailed
from engine.training.backends import StepStats, TrainBackend
from engine.training.checkpoints import Checkpoints
from engine.training.schedule import Schedule, lr_at, pad_blocks
from engine.training.selection import MemorizationSelection, Selector

log = logging.getLogger(__name__)


class TargetSource(Protocol):
    """Where `fit` gets targets: `targets_for(block_ids)` → one row per block id, in that order.

    A tensor is one (`TensorTargets`); the distributed engine's stream from the teachers is another.
    `fit` asks in the order `Schedule.requests` gives, so a producer can make them ahead of time.
    """

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor: ...

    def scalars(self) -> dict[str, float]:
        """Observability of the last call (queue depth, producer throughput); logged per step."""
        ...


class TensorTargets:
    def __init__(self, targets: torch.Tensor):
        self.targets = targets

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor:
        return self.targets[block_ids]

    def scalars(self) -> dict[str, float]:
        return {}


@dataclass
class FitResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int = -1
    best_val_loss: float = float("inf")
    seconds: float = 0.0
    interrupted: bool = False  # stopped early by the `stop` flag, after checkpointing
    label_wait_seconds: float = 0.0  # spent waiting for targets (a teacher's queue)
    tokens: int = 0  # the objective's units over all ranks (trained tokens for token-level objectives)
    tokens_seen: int = 0  # tokens through the model in steps that updated it, all ranks (a bundle counts both blocks)
    # memorization-aware phases (`selection.Selector`): the current selection, the stop level, [step, mean g,
    # selected] per re-scoring, blocks each step ascended on, whether the mean g fell below the stop level
    selected: list[int] = field(default_factory=list)
    stop_level: float | None = None
    memorization: list[list[float]] = field(default_factory=list)
    touched: list[int] = field(default_factory=list)
    stopped_early: bool = False


class _Validation:
    """This rank's share of the held-out blocks; keeps the best weights in `save_to` when asked."""

    def __init__(self, backend: TrainBackend, schedule: Schedule, input_ids: torch.Tensor, targets_for: TargetSource, micro_batch_size: int):
        mine = schedule.val_share(backend.rank)
        self.backend, self.micro_batch_size = backend, micro_batch_size
        self.input_ids, self.targets = pad_blocks(input_ids[mine], targets_for(mine), schedule.val_share_size)

    def run(self, step: int, result: FitResult, save_to: Path | None, writer, desc: str) -> None:
        loss_sum, count, size = 0.0, 0, self.micro_batch_size
        for i in range(0, self.input_ids.shape[0], size):
            s, c = self.backend.eval_loss(self.input_ids[i : i + size], self.targets[i : i + size])
            loss_sum, count = loss_sum + s, count + c
        val_loss = loss_sum / max(count, 1)
        result.val_losses.append((step, val_loss))
        if writer is not None:
            writer.add_scalar(f"{desc}/val_loss", val_loss, step)
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_step = val_loss, step
            if save_to is not None:
                self.backend.save(save_to)
        log.info("%s step %d: val loss %.4f (best %.4f at step %d)", desc, step, val_loss, result.best_val_loss, result.best_step)


def _log_step(writer, desc: str, step: int, stats: StepStats, lr: float, seconds: float, waited: float, source: TargetSource, tokens: int) -> None:
    scalars = {"loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm, "tokens_per_s": tokens / max(seconds, 1e-9), "label_wait_s": waited}
    for name, value in {**scalars, **source.scalars()}.items():
        writer.add_scalar(f"{desc}/{name}", value, step)


def _resume(checkpoints: Checkpoints | None, resume: bool, desc: str) -> tuple[int, FitResult]:
    if not resume:
        return 0, FitResult()
    if checkpoints is None:
        raise ValueError("resume needs a checkpoint_dir")
    state = checkpoints.load()
    if state is None:
        log.info("%s: no checkpoint in %s, starting fresh", desc, checkpoints.root)
        return 0, FitResult()
    return state["step"], FitResult(**state["result"])


def _micro_batches(input_ids: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(input_ids[i : i + size], targets[i : i + size]) for i in range(0, input_ids.shape[0], size)]


def _checkpoint(checkpoints: Checkpoints, step: int, result: FitResult, start: float) -> None:
    result.seconds = time.perf_counter() - start
    checkpoints.save(step, {"step": step, "result": asdict(result)})


def _save_final(backend: TrainBackend, save_to: Path, task_arithmetic: tuple[Path, float] | None) -> None:
    if task_arithmetic is not None:
        backend.extrapolate_from(*task_arithmetic)
    backend.save(save_to)


def fit(
    backend: TrainBackend,
    input_ids: torch.Tensor,
    targets: torch.Tensor | TargetSource,
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
    selection: MemorizationSelection | None = None,
    task_arithmetic: tuple[Path, float] | None = None,
) -> FitResult:
    """Train on [B, L] blocks; validate on a held-out split and save the best (or last) weights.

    `targets` is a tensor with one row per block or a `TargetSource` asked in `Schedule.requests` order.
    With `keep_best` and a validation split, `save_to` receives the weights with the lowest validation loss
    (the WHP paper keeps the best checkpoint on the generic labels); otherwise the final weights.

    Every rank calls it with the same data and trains on its share of each step (`Schedule`). A checkpoint
    (every `checkpoint_every` steps into `checkpoint_dir`, and when `stop.is_set()` on any rank, which then
    returns early) holds the step and RNG, so `resume` ends with the same weights as an uninterrupted run.
    `progress(step, total_steps, loss)` replaces the progress bar on rank 0. A non-finite loss ends the phase
    with `RunFailed` (the latest checkpoint stays). A `selection` trains on the selected blocks only and may
    end the phase early; `task_arithmetic` = (θ_ref, λ) saves θ_ref − λ·(θ − θ_ref) instead of the final θ.
    """
    rank = backend.rank
    targets_for = TensorTargets(targets) if isinstance(targets, torch.Tensor) else targets
    schedule = Schedule.make(input_ids.shape[0], cfg, backend.world_size)
    total_steps, eval_every = schedule.total_steps, cfg.eval_every or schedule.steps_per_epoch
    writer = writer if rank == 0 else None
    checkpoints = Checkpoints(checkpoint_dir, backend) if checkpoint_dir is not None else None
    first_step, result = _resume(checkpoints, resume, desc)
    start = time.perf_counter() - result.seconds
    validation = _Validation(backend, schedule, input_ids, targets_for, cfg.micro_batch_size)  # asks first, like the labelers expect
    validate = keep_best and schedule.val_ids.numel() > 0
    if validate and first_step == 0:
        validation.run(0, result, save_to, writer, desc)
    bar = tqdm(total=total_steps, initial=first_step, desc=desc, unit="step", dynamic_ncols=True, disable=rank != 0 or progress is not None)
    selector = Selector(selection, backend, input_ids, schedule, result) if selection else None
    for step, step_ids in schedule.steps(first_step):
        if selector is not None and selector.stop_before(step, desc):
            break
        chosen = schedule.share(step_ids, rank)
        t_wait = time.perf_counter()
        chosen_targets = targets_for(chosen) if selector is None else selector.mask(chosen, targets_for(chosen), step_ids)
        t0 = time.perf_counter()
        result.label_wait_seconds += t0 - t_wait
        lr = lr_at(step, total_steps, cfg)
        stats = backend.train_step(_micro_batches(input_ids[chosen], chosen_targets, cfg.micro_batch_size), lr)
        if not math.isfinite(stats.loss):  # the same all-reduced loss on every rank: all of them stop here
            bar.close()
            raise RunFailed(f"{desc}: the loss became {stats.loss} at step {step + 1} (lower the learning rate, check the data)")
        result.losses.append(stats.loss)
        seen = step_ids.numel() * input_ids[0].numel() if stats.tokens else 0
        result.steps, result.tokens, result.tokens_seen = step + 1, result.tokens + stats.tokens, result.tokens_seen + seen
        if writer is not None:
            _log_step(writer, desc, step + 1, stats, lr, time.perf_counter() - t0, t0 - t_wait, targets_for, seen)
        if progress is not None and rank == 0:
            progress(step + 1, total_steps, stats.loss)
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        bar.update()
        if validate and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
            validation.run(step + 1, result, save_to, writer, desc)
        result.interrupted = step + 1 < total_steps and stop is not None and backend.all_reduce(float(stop.is_set()))[0] > 0
        if checkpoints is not None and (result.interrupted or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            _checkpoint(checkpoints, step + 1, result, start)
        if result.interrupted:
            log.info("%s: stopped at step %d", desc, step + 1)
            break
    bar.close()
    if not validate and save_to is not None and not result.interrupted:
        _save_final(backend, save_to, task_arithmetic)
    result.seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.1fs, final loss %.4f", desc, result.steps, result.seconds, result.losses[-1] if result.losses else float("nan"))
    return result
