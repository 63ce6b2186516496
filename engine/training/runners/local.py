"""The in-process runner (`engine.workers=0`): for debugging and small models; no Ray, no DeepSpeed."""

from __future__ import annotations

from typing import Any, Callable

import torch

from configs.errors import RunFailed, first_line
from engine.models import load_model, load_tokenizer, pick_device, save_model
from engine.training.backends import TorchBackend
from engine.training.job import PhaseResult, StopFlag, TrainJob, check_interrupted, checkpoint_note, fit_job, throughput


class LocalRunner:
    """Runs phases in this process; the teacher makes targets when a step needs them (no overlap)."""

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def on_ranks(self, fn: Callable[..., Any], *args: Any, what: str) -> list[Any]:
        """`fn(*args)` here, as the only rank (the in-process evaluation)."""
        return [fn(*args)]

    def train(self, job: TrainJob, resume: bool) -> PhaseResult:
        with StopFlag().installed() as stop:
            try:
                return _train(job, resume, stop)
            except torch.OutOfMemoryError as exc:
                raise RunFailed(f"{job.phase}: out of memory ({first_line(exc)}); {checkpoint_note(job)}") from None
            except RunFailed as exc:
                raise RunFailed(f"{exc}; {checkpoint_note(job)}") from None


def _train(job: TrainJob, resume: bool, stop: StopFlag) -> PhaseResult:
    device = pick_device(job.device)
    tokenizer = load_tokenizer(job.init, "initial")
    model = load_model(job.init, "initial", device)
    autocast = torch.bfloat16 if job.torch_dtype(device) == torch.bfloat16 else None
    model, scorer = job.scoring(model, {role: load_model(path, role, device).eval() for role, path in job.frozen_models().items()})
    backend = TorchBackend(model, job.train, save_fn=lambda m, path: save_model(m, tokenizer, path), autocast_dtype=autocast, objective=job.objective, scorer=scorer)
    teacher = job.teacher.build(device, job.torch_dtype(device)) if job.teacher else None
    result = fit_job(job, backend, teacher, resume, stop)
    check_interrupted(job, result, stop)
    if teacher is None:
        return PhaseResult(result, None, throughput(result))
    rate = teacher.units_done / teacher.busy_seconds if teacher.busy_seconds else 0.0
    return PhaseResult(result, teacher.stats(), throughput(result, rate, teacher.busy_seconds / max(result.seconds, 1e-9)))
