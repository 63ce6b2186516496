"""One training phase (reinforce or unlearn) as a job any trainer can run.

A `TrainJob` holds everything a trainer rank needs and is picklable, so the same job runs in this process
(`LocalTrainer`: TorchBackend, labels made on demand, `engine.workers=0`) or on Ray workers as a DeepSpeed
ZeRO-3 group (`engine.training.runners.ray_runner.RayTrainer`, whose ranks call `train_rank`). Reinforce trains on plain
next-token labels; unlearn on generic labels from a `GenericLabeler` built from the job's `LabelerSpec`.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.tensorboard import SummaryWriter

from configs import LabelConfig, TrainConfig
from engine.data.corpus import Block
from configs.errors import Interrupted
from engine.methods.generic_labels import GenericLabeler
from engine.models import load_model, load_tokenizer, pick_device, save_model
from engine.training.loop import FitResult, LabelSource, TorchBackend, fit

log = logging.getLogger(__name__)


@dataclass
class LabelerSpec:
    """What a labeler needs: the two frozen models, the blocks and the anchor dictionary."""

    baseline: Path
    reinforced: Path
    blocks: list[Block]
    anchors: dict[str, list[str]]
    labels: LabelConfig

    def build(self, device: torch.device, dtype: torch.dtype = torch.float32) -> GenericLabeler:
        baseline = load_model(self.baseline, "baseline", device, dtype).eval()
        reinforced = load_model(self.reinforced, "reinforced", device, dtype).eval()
        return GenericLabeler(baseline, reinforced, load_tokenizer(self.baseline, "baseline"), self.blocks, self.anchors, self.labels)

    def build_sharded(self, dtype: torch.dtype = torch.float32) -> GenericLabeler:
        """One rank of a labeler group (torchrun-style env) holding 1/WORLD_SIZE of both frozen models under
        ZeRO-3: for models too big for one device. Every rank of the group must label in step."""
        import deepspeed
        import torch.distributed as dist

        from engine.training.zero import load_zero3_model

        ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == torch.bfloat16}}
        engines = [deepspeed.initialize(model=load_zero3_model(path, ds_config, dtype), config=ds_config)[0] for path in (self.baseline, self.reinforced)]
        baseline, reinforced = (engine.module.eval() for engine in engines)
        labeler = GenericLabeler(baseline, reinforced, load_tokenizer(self.baseline, "baseline"), self.blocks, self.anchors, self.labels, shard_group=dist.group.WORLD)
        labeler.engines = engines  # the engines own the hooks that gather each layer's shards in forward
        return labeler


@dataclass
class TrainJob:
    """One phase: fine-tune `init` on `input_ids` with plain labels (no labeler) or generic ones."""

    phase: str  # reinforce | unlearn: the tensorboard and progress name
    init: Path  # the model training starts from
    train: TrainConfig
    input_ids: torch.Tensor  # [B, L] blocks of the target corpus
    labeler: LabelerSpec | None  # None: labels = input_ids (next-token)
    save_to: Path  # the consolidated HF model (best validation, or final)
    keep_best: bool
    checkpoint_dir: Path
    checkpoint_every: int
    tb_dir: Path
    dtype: str = "float32"  # float32 | bfloat16 (bf16 on GPU only)
    device: str = "auto"
    deepspeed: dict[str, Any] = field(default_factory=dict)  # user JSON merged over the generated config

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" and device.type == "cuda" else torch.float32


@dataclass
class PhaseResult:
    fit: FitResult
    label_stats: dict | None  # LabelSet-style statistics of the generic labels (unlearn)
    throughput: dict[str, float]  # tokens/s, label wait fraction, labeler tokens/s and utilization


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


def throughput(result: FitResult, labeler_tokens_per_s: float = 0.0, labeler_utilization: float = 0.0) -> dict[str, float]:
    """Trained tokens/s and the share of training time spent waiting for labels, beside the labelers' tokens/s
    while computing (summed over labelers) and their utilization (computing vs. blocked on full queues)."""
    seconds = max(result.seconds, 1e-9)
    return {
        "tokens_per_s": result.tokens / seconds,
        "label_wait_fraction": result.label_wait_seconds / seconds,
        "labeler_tokens_per_s": labeler_tokens_per_s,
        "labeler_utilization": labeler_utilization,
    }


def _fit(job: TrainJob, backend, labels: LabelSource | None, resume: bool, stop, progress=None, rank: int = 0) -> FitResult:
    writer = SummaryWriter(str(job.tb_dir)) if rank == 0 else None
    try:
        return fit(
            backend, job.input_ids, labels if labels is not None else job.input_ids, job.train,
            save_to=job.save_to, keep_best=job.keep_best, writer=writer, desc=job.phase,
            checkpoint_dir=job.checkpoint_dir, checkpoint_every=job.checkpoint_every, resume=resume, stop=stop, progress=progress,
        )
    finally:
        if writer is not None:
            writer.close()


def train_local(job: TrainJob, resume: bool, stop: StopFlag) -> PhaseResult:
    """The phase in this process; labels are made when the step needs them (no overlap)."""
    device = pick_device(job.device)
    tokenizer = load_tokenizer(job.init, "initial")
    model = load_model(job.init, "initial", device)
    autocast = torch.bfloat16 if job.torch_dtype(device) == torch.bfloat16 else None
    backend = TorchBackend(model, job.train, save_fn=lambda m, path: save_model(m, tokenizer, path), autocast_dtype=autocast)
    labeler = job.labeler.build(device, job.torch_dtype(device)) if job.labeler else None
    result = _fit(job, backend, labeler, resume, stop)
    check_interrupted(job, result, stop)
    if labeler is None:
        return PhaseResult(result, None, throughput(result))
    rate = labeler.tokens_labeled / labeler.busy_seconds if labeler.busy_seconds else 0.0
    return PhaseResult(result, labeler.stats(), throughput(result, rate, labeler.busy_seconds / max(result.seconds, 1e-9)))


def train_rank(job: TrainJob, labels: LabelSource | None, resume: bool, stop, progress: Callable[[int, int, float], None] | None) -> FitResult:
    """One rank of a DeepSpeed ZeRO-3 group (joined from torchrun-style env): every rank calls it alike."""
    from engine.training.zero import DeepSpeedBackend, ds_config_for, ensure_distributed, load_zero3_model

    ensure_distributed()
    world_size = torch.distributed.get_world_size()
    device = pick_device(job.device)
    dtype = job.torch_dtype(device)
    ds_config = ds_config_for(job.train, world_size, dtype, user=job.deepspeed)
    model = load_zero3_model(job.init, ds_config, dtype)
    backend = DeepSpeedBackend(model, job.train, ds_config, tokenizer=load_tokenizer(job.init, "initial"))
    return _fit(job, backend, labels, resume, stop, progress, rank=backend.rank)


class LocalTrainer:
    """Runs phases in this process (`engine.workers=0`): for debugging and small models."""

    def __enter__(self) -> LocalTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def train(self, job: TrainJob, resume: bool) -> PhaseResult:
        with StopFlag().installed() as stop:
            return train_local(job, resume, stop)
