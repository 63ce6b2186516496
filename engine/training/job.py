"""One training phase as a job any runner can run, and the protocols that tie runners to methods.

A `TrainJob` holds everything a trainer rank needs and is picklable, so the same job runs in this process
(`runners.local.LocalRunner`: TorchBackend, targets made on demand, `engine.workers=0`) or on Ray workers
as a DeepSpeed ZeRO-3 group fed by teacher processes (`runners.ray_runner.RayRunner`). The method decides
the job's objective and its teacher — the frozen models that stream per-block targets (WHP: generic
labels); without a teacher the targets are the input ids themselves.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed
from torch.utils.tensorboard import SummaryWriter

from configs import TrainConfig
from configs.errors import Interrupted
from engine.models import torch_dtype
from engine.training.backends import LogitScorer, Scorer
from engine.training.checkpoints import latest_step
from engine.training.loop import FitResult, TargetSource, fit
from engine.training.objectives import Objective
from engine.training.offset import OffsetEnsemble, OffsetHead, OffsetScorer
from engine.training.selection import MemorizationSelection

log = logging.getLogger(__name__)


class Teacher(TargetSource, Protocol):
    """Frozen models that make the targets of any blocks on demand, inside a teacher process or in this one."""

    units_done: int  # tokens (or blocks) processed so far
    busy_seconds: float  # time spent computing them

    def stats(self) -> dict:
        """What the teacher reports about its targets (WHP: label statistics), over the blocks it made."""
        ...


def forward_rounds(batches: int, shard_group, device: torch.device) -> int:
    """Forward batches a teacher runs for one request: its own, or — ranks of a ZeRO-3 shard group gather
    each layer together — the most that any rank of its group needs (the others run dummy batches)."""
    if shard_group is None:
        return batches
    most = torch.tensor([batches], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=shard_group)
    return int(most.item())


class TeacherSpec(Protocol):
    """What a teacher process needs to build its teacher: picklable, shipped to Ray actors."""

    role: str  # how logs and errors name one process ("labeler")

    def build(self, device: torch.device, dtype: torch.dtype) -> Teacher: ...

    def build_sharded(self, dtype: torch.dtype) -> Teacher:
        """One rank of a teacher group (torchrun-style env) holding 1/WORLD_SIZE of the frozen models under
        ZeRO-3; every rank of the group must make targets in step."""
        ...

    def merge_stats(self, parts: list[dict]) -> dict:
        """The stats of several teachers' disjoint blocks as if one teacher had made them all."""
        ...


@dataclass
class TrainJob:
    """One phase: fine-tune `init` on `input_ids` ([B, L] blocks, or [B, 2, L] forget + retain bundles)
    toward the teacher's targets (or the input ids)."""

    phase: str  # the tensorboard, checkpoint and progress name
    init: Path  # the model training starts from
    train: TrainConfig
    input_ids: torch.Tensor  # [B, L] blocks of the corpus
    objective: Objective
    teacher: TeacherSpec | None  # None: targets = input_ids
    save_to: Path  # the consolidated HF model (best validation, or final)
    keep_best: bool
    checkpoint_dir: Path
    checkpoint_every: int
    tb_dir: Path
    dtype: str = "float32"  # float32 | bfloat16 (bf16 on GPU only)
    device: str = "auto"
    deepspeed: dict[str, Any] = field(default_factory=dict)  # user JSON merged over the generated config
    selection: MemorizationSelection | None = None  # memorization-aware: which blocks steps ascend on, when to stop
    task_arithmetic: tuple[Path, float] | None = None  # (θ_ref, λ): save θ_ref − λ·(θ − θ_ref) instead of θ
    reference: Path | None = None  # a frozen model the trainer holds (partitioned under ZeRO-3): logits on retain rows for a KL term
    offset: OffsetEnsemble | None = None  # offset unlearning: `init` is o, trained as o′ in the ensemble with M and o
    frozen_zero: dict[str, Any] = field(default_factory=dict)  # zero_optimization settings for the frozen models (the user's offload, stage3_*)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return torch_dtype(self.dtype, device)

    def frozen_models(self) -> dict[str, Path]:
        """The frozen models a trainer rank holds beside the one it trains, by role."""
        if self.offset is not None:
            return {"baseline": self.offset.baseline, "small": self.offset.small}
        return {"reference": self.reference} if self.reference is not None else {}

    def scoring(self, model: torch.nn.Module, frozen: dict[str, torch.nn.Module]) -> tuple[torch.nn.Module, Scorer]:
        """The module a backend trains and how it scores a micro-batch, given `frozen_models()` loaded (whole,
        or as ZeRO-3 engines): the model and its logits, or for offset unlearning o′ inside `OffsetHead`."""
        if self.offset is None:
            return model, LogitScorer(frozen.get("reference"))
        return OffsetHead(model, self.offset), OffsetScorer(frozen["baseline"], frozen["small"], self.offset)


@dataclass
class PhaseResult:
    fit: FitResult
    teacher_stats: dict | None  # the teachers' merged stats (WHP: label statistics)
    throughput: dict[str, float]  # tokens/s, target wait fraction, teacher tokens/s and utilization


class Runner(Protocol):
    """Runs training phases and the evaluation; a context manager so a cluster it started stays up for later phases."""

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def train(self, job: TrainJob, resume: bool) -> PhaseResult: ...

    def on_ranks(self, fn: Callable[..., Any], *args: Any, what: str) -> list[Any]:
        """`fn(*args)` on every rank of a group laid out like the trainers (in this process: once), the
        results in rank order; `what` names the work in logs and errors. The evaluation runs here."""
        ...


class StopFlag:
    """Set by SIGINT/SIGTERM while installed: the phase checkpoints and stops at the end of its step.
    A second signal aborts at once (the default behaviour)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum = 0

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int) -> None:
        self.signum = signum
        self._event.set()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handle(signum, frame):
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.warning("%s: checkpointing at the end of this step (again to abort)", signal.Signals(signum).name)
            self.set(signum)

        for sig in previous:
            signal.signal(sig, handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def check_interrupted(job: TrainJob, result: FitResult, stop: StopFlag) -> None:
    if result.interrupted:
        name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
        raise Interrupted(f"{job.phase} stopped by {name} at step {result.steps}; checkpoint in {job.checkpoint_dir}: rerun the same command with --resume", stop.signum or signal.SIGTERM)


def checkpoint_note(job: TrainJob) -> str:
    """What a fatal error leaves behind for `--resume`."""
    step = latest_step(job.checkpoint_dir)
    return f"the checkpoint of step {step} is kept in {job.checkpoint_dir}: rerun with --resume once fixed" if step else "no checkpoint was written yet"


def throughput(result: FitResult, teacher_tokens_per_s: float = 0.0, teacher_utilization: float = 0.0) -> dict[str, float]:
    """Trained tokens/s and the share of training time spent waiting for targets, beside the teachers' tokens/s
    while computing (summed over teachers) and their utilization (computing vs. blocked on full queues)."""
    seconds = max(result.seconds, 1e-9)
    return {
        "tokens_per_s": result.tokens_seen / seconds,
        "label_wait_fraction": result.label_wait_seconds / seconds,
        "labeler_tokens_per_s": teacher_tokens_per_s,
        "labeler_utilization": teacher_utilization,
    }


def fit_job(job: TrainJob, backend, targets: TargetSource | None, resume: bool, stop, progress: Callable[[int, int, float], None] | None = None) -> FitResult:
    """`fit` with the job's settings; rank 0 writes the tensorboard scalars."""
    writer = SummaryWriter(str(job.tb_dir)) if backend.rank == 0 else None
    try:
        return fit(
            backend, job.input_ids, targets if targets is not None else job.input_ids, job.train,
            save_to=job.save_to, keep_best=job.keep_best, writer=writer, desc=job.phase,
            checkpoint_dir=job.checkpoint_dir, checkpoint_every=job.checkpoint_every, resume=resume, stop=stop, progress=progress,
            selection=job.selection, task_arithmetic=job.task_arithmetic,
        )
    finally:
        if writer is not None:
            writer.close()
