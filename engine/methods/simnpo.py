"""SimNPO (Fan et al. 2024): NPO without a reference model, length-normalised, with a reward margin γ."""

from __future__ import annotations

from typing import ClassVar

from engine.methods.npo import NPO
from engine.training.objectives import Objective, SimNPOLoss


class SimNPO(NPO):
    name: ClassVar[str] = "simnpo"
    what: ClassVar[str] = "SimNPO (reference-free)"
    teacher_role: ClassVar[str] = ""
    teacher_models: ClassVar[tuple[str, ...]] = ()

    def objective(self) -> Objective:
        loss = self.cfg.loss
        return SimNPOLoss(loss.beta, loss.gamma, loss.retain_weight if self.uses_retain else 0.0)

    def teacher(self, inputs):
        return None
