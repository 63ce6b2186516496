"""GradDiff: gradient ascent on the forget set and descent on a retain set, each step on as many of both."""

from __future__ import annotations

from typing import ClassVar

from engine.methods.gradient_ascent import GradientAscent
from engine.training.objectives import GradDiffLoss, Objective


class GradDiff(GradientAscent):
    name: ClassVar[str] = "graddiff"
    what: ClassVar[str] = "GradDiff (ascent on the forget set, weighted NLL on the retain set)"

    @property
    def uses_retain(self) -> bool:
        return True

    def objective(self) -> Objective:
        return GradDiffLoss(self.cfg.loss.retain_weight)
