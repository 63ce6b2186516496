"""NPO (Zhang et al. 2024): negative preference optimization against the frozen baseline, whose log-probability
of each forget block a `reference` teacher streams (a float per block); with a retain NLL term by default."""

from __future__ import annotations

from typing import ClassVar

from engine.methods.base import RunInputs
from engine.methods.gradient_ascent import GradientAscent
from engine.methods.reference import ReferenceSpec
from engine.training.job import TeacherSpec
from engine.training.objectives import NPOLoss, Objective


class NPO(GradientAscent):
    name: ClassVar[str] = "npo"
    what: ClassVar[str] = "NPO against the frozen baseline"
    teacher_role: ClassVar[str] = ReferenceSpec.role
    teacher_models: ClassVar[tuple[str, ...]] = ("baseline",)

    @property
    def uses_retain(self) -> bool:
        return self.cfg.loss.retain_loss != "none"

    def objective(self) -> Objective:
        return NPOLoss(self.cfg.loss.beta, self.cfg.loss.retain_weight if self.uses_retain else 0.0)

    def teacher(self, inputs: RunInputs) -> TeacherSpec:
        return ReferenceSpec(inputs.baseline, inputs.forget_blocks, self.cfg.labels.batch_size)
