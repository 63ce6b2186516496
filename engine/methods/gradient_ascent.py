"""Gradient ascent on the forget set: the baseline every unlearning paper compares against.

One phase: from the baseline, maximize the next-token loss of the forget set (minimize its negative),
token-weighted like every objective here, for `unlearn.epochs` / `unlearn.max_steps`; the final weights are
published (lower is not better for an unbounded objective, so no best-checkpoint selection). No teacher:
the targets are the input ids. Set `unlearn.val_fraction=0` to ascend on every block.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from configs import RunConfig
from engine.methods.base import Phase, RunInputs, TrainingSummary
from engine.training.job import PhaseResult
from engine.training.objectives import causal_lm_loss_sum, trained_tokens


class AscentLoss:
    """The negated next-token cross-entropy of the forget text."""

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -causal_lm_loss_sum(logits, targets)[0]


class GradientAscent:
    name: ClassVar[str] = "ga"
    outputs: ClassVar[dict[str, str]] = {}
    exports: ClassVar[tuple[str, ...]] = ()
    phases = ("unlearn",)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        pass  # the baseline and the forget set are all it needs

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        return Phase("unlearn", inputs.baseline, self.cfg.unlearn, AscentLoss())

    def export(self, name: str, inputs: RunInputs, staging: Path, device: torch.device) -> None:
        raise AssertionError("gradient ascent has no exports")

    def summary(self, result: PhaseResult) -> TrainingSummary:
        final = result.fit.losses[-1] if result.fit.losses else None
        return TrainingSummary.of(self.name, result, self.cfg.engine.workers, final_loss=final, lr=self.cfg.unlearn.lr)

    @staticmethod
    def describe(name: str, s: dict) -> str:
        engine = f"{s['workers']} DeepSpeed ZeRO-3 worker(s)" if s.get("workers") else "in-process"
        final = f"{-s['final_loss']:.4f}" if s["final_loss"] is not None else "none"
        return f"{name}: gradient ascent on the forget set, {s['steps']} steps at lr {s['lr']:g} (final forget loss {final}), trained {engine}"
