"""GradDiff: gradient ascent on the forget set and descent on a retain set, each step on as many of both.

The retain term is the retain text's NLL (`loss.retain_loss=nll`) or, with `kl`, the KL divergence from the
frozen baseline's next-token distributions on it (the "KL" baseline of the unlearning literature)."""

from __future__ import annotations

from typing import ClassVar

from configs.errors import UserError
from engine.methods.base import RunInputs
from engine.methods.gradient_ascent import GradientAscent
from engine.training.objectives import GradDiffLoss, Objective


class GradDiff(GradientAscent):
    name: ClassVar[str] = "graddiff"
    what: ClassVar[str] = "GradDiff (ascent on the forget set, a weighted retain term)"

    @property
    def uses_retain(self) -> bool:
        return True

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        if self.cfg.loss.retain_loss == "none":
            raise UserError("method graddiff needs a retain term: loss.retain_loss must be nll or kl (without one it is ga)")
        super().prepare(todo, inputs)

    def objective(self) -> Objective:
        return GradDiffLoss(self.cfg.loss.retain_weight, self.retain_kl)
