"""Gradient ascent on the forget set: the baseline every unlearning paper compares against, and the one-phase
shape the other direct methods (graddiff, npo, simnpo, sga) take with their own objective.

One phase: from the baseline, minimize the method's objective on the forget blocks (bundled with retain
blocks when the objective has a retain term) for `unlearn.epochs` / `unlearn.max_steps`; the final weights
are published (lower is not better for an unbounded objective, so no best-checkpoint selection). Set
`unlearn.val_fraction=0` to ascend on every block.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from configs import RunConfig
from configs.errors import UserError
from engine.methods.base import Phase, RunInputs, TrainingSummary
from engine.training.job import PhaseResult, TeacherSpec
from engine.training.objectives import AscentLoss, Objective


class GradientAscent:
    name: ClassVar[str] = "ga"
    outputs: ClassVar[dict[str, str]] = {}
    exports: ClassVar[tuple[str, ...]] = ()
    what: ClassVar[str] = "gradient ascent on the forget set"  # the report's description
    teacher_role: ClassVar[str] = ""
    teacher_models: ClassVar[tuple[str, ...]] = ()
    train_sections: ClassVar[dict[str, str]] = {"unlearn": "unlearn"}
    phases = ("unlearn",)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @property
    def uses_retain(self) -> bool:
        """Whether steps bundle each forget block with a retain block."""
        return False

    @property
    def retain_kl(self) -> bool:
        """The retain term is KL(baseline ‖ model): the trainer then holds the frozen baseline too."""
        return self.uses_retain and self.cfg.loss.retain_loss == "kl"

    @property
    def trainer_frozen_models(self) -> int:
        return int(self.retain_kl)

    def objective(self) -> Objective:
        return AscentLoss()

    def teacher(self, inputs: RunInputs) -> TeacherSpec | None:
        return None

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        if self.uses_retain and "unlearn" in todo and not inputs.retain_blocks:
            hint = "" if self.name == "graddiff" else " or set loss.retain_loss=none"
            raise UserError(f"method {self.name} needs a retain set: give retain: (general text the model must keep){hint}")

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        examples = inputs.bundles(self.cfg.unlearn.seed) if self.uses_retain else None
        reference = inputs.baseline if self.retain_kl else None
        return Phase("unlearn", inputs.baseline, self.cfg.unlearn, self.objective(), teacher=self.teacher(inputs), examples=examples, reference=reference)

    def export(self, name: str, inputs: RunInputs, staging: Path, device: torch.device) -> None:
        raise AssertionError(f"{self.name} has no exports")

    def summary(self, result: PhaseResult) -> TrainingSummary:
        final = result.fit.losses[-1] if result.fit.losses else None
        return TrainingSummary.of(self.name, result, self.cfg.engine.workers, final_loss=final, lr=self.cfg.unlearn.lr, retain=self.cfg.loss.retain_loss if self.uses_retain else "none")

    @classmethod
    def describe(cls, name: str, s: dict) -> str:
        engine = f"{s['workers']} DeepSpeed ZeRO-3 worker(s)" if s.get("workers") else "in-process"
        final = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "none"
        return f"{name}: {cls.what}, {s['steps']} steps at lr {s['lr']:g} (final objective {final}), trained {engine}"
