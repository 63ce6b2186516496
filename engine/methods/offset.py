"""Offset (δ-) unlearning (Huang et al., TMLR 2025): the model being unlearned, M (the baseline), never changes.

A smaller model o of M's tokenizer and vocabulary and its trainable copy o′ (started from o's weights) shift
M's logits: z = z_M + α·(z_o′ − z_o), which equals M at the start. The direct methods' own objectives — gradient
ascent, GradDiff, NPO against M, and the KL to M on retain text (`loss.retain_loss=kl`) — apply to the
ensemble's scores, and only o′ trains. The trainer holds M and o frozen (ZeRO-3-partitioned on Ray) and
scores through `kernels.offset_token_stats`, so no [tokens × vocab] logits exist (`engine.training.offset`).

RUN/unlearned is an offset artifact: o′'s weights with its tokenizer and offset.json naming M, o and α — no
forget data. `engine.models.load_model` makes it an `OffsetModel` (engine/offset_model.py), which the
evaluation and its attacks take like any causal LM.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from configs.errors import UserError
from engine.methods.base import Phase, RunInputs, TrainingSummary
from engine.methods.gradient_ascent import GradientAscent
from engine.methods.graddiff import GradDiff
from engine.methods.npo import NPO
from engine.models import check_model_dir, check_same_tokenizer, check_tokenizer_fits, config_vocab_size, load_tokenizer
from engine.training.job import PhaseResult
from engine.training.offset import OffsetEnsemble


class Offset:
    """What offset unlearning changes in the direct method it precedes in the bases: the phase trains o′ from
    `offset.small` in the ensemble with M and o, which the trainer holds frozen."""

    trainer_frozen_models: ClassVar[int] = 2  # M and o

    @property
    def small(self) -> Path:
        return Path(self.cfg.offset.small).expanduser()

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        super().prepare(todo, inputs)
        if "unlearn" not in todo:
            return
        if not self.cfg.offset.small:
            raise UserError(f"method {self.name} needs offset.small: a smaller causal LM with the baseline's tokenizer and vocabulary (o; o′ is trained from it)")
        small = check_model_dir(self.small, "offset.small")
        tokenizer = load_tokenizer(small, "offset.small")
        check_tokenizer_fits(tokenizer, small, "offset.small")
        check_same_tokenizer(inputs.tokenizer, tokenizer, ("baseline", "offset.small"))
        sizes = [config_vocab_size(path) for path in (inputs.baseline, small)]
        if sizes[0] != sizes[1]:
            raise UserError(f"the baseline and offset.small models have different vocabularies ({sizes[0]} and {sizes[1]} rows): the offset adds their logits token by token")

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        ensemble = OffsetEnsemble(inputs.baseline, self.small, self.cfg.offset.alpha, self.retain_kl)
        phase = super().phase(name, inputs)
        return replace(phase, init=self.small, train=replace(phase.train, lr=self.lr), reference=None, offset=ensemble)

    @property
    def lr(self) -> float:
        return self.cfg.offset.lr or self.cfg.unlearn.lr

    @classmethod
    def describe(cls, name: str, s: dict) -> str:
        return f"{super().describe(name, s)}; o′ trained from {s['small']}, α {s['alpha']:g} (the ensemble runs three models per token)"

    def summary(self, result: PhaseResult) -> TrainingSummary:
        summary = super().summary(result)
        return replace(summary, details={**summary.details, "lr": self.lr, "alpha": self.cfg.offset.alpha, "small": str(self.small)})


class OffsetGradientAscent(Offset, GradientAscent):
    name: ClassVar[str] = "offset-ga"
    what: ClassVar[str] = "offset unlearning, gradient ascent on the ensemble"


class OffsetGradDiff(Offset, GradDiff):
    name: ClassVar[str] = "offset-graddiff"
    what: ClassVar[str] = "offset unlearning, GradDiff on the ensemble"


class OffsetNPO(Offset, NPO):
    name: ClassVar[str] = "offset-npo"
    what: ClassVar[str] = "offset unlearning, NPO of the ensemble against the baseline"
