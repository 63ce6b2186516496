"""Selective gradient ascent (Barbulescu & Triantafillou, ICML 2024): ascend only on what is still memorized.

Each forget block is scored by g(x), its greedy next-token accuracy after `memorization.prefix_length`
tokens under the model being trained. Every epoch (or `memorization.rescore_every` steps) the trainer
re-scores all blocks; steps then ascend only on the blocks with g ≥ `memorization.select_threshold` plus
the most memorized one, and the phase stops once the mean g falls below the stop level:
`memorization.stop_level`, or else the baseline's mean g on unseen text of the same kind (`eval.holdout_set`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from configs.errors import UserError
from engine.data.corpus import make_blocks, read_corpus
from engine.methods.base import Phase, RunInputs, TrainingSummary
from engine.methods.gradient_ascent import GradientAscent
from engine.training.job import PhaseResult
from engine.training.selection import MemorizationSelection


def check_prefix(cfg) -> None:
    if cfg.memorization.prefix_length >= cfg.labels.context_length:
        raise UserError(f"memorization.prefix_length ({cfg.memorization.prefix_length}) must be below labels.context_length ({cfg.labels.context_length}): g(x) counts the tokens after it")


def holdout_ids(cfg, inputs: RunInputs) -> torch.Tensor | None:
    """The holdout set in blocks like the forget set's, when no stop level is given: what sets it."""
    check_prefix(cfg)
    if cfg.memorization.stop_level is not None:
        return None
    if not cfg.eval.holdout_set:
        raise UserError(f"method {cfg.method} needs memorization.stop_level or eval.holdout_set (unseen text like the target) to set its stop level")
    blocks = make_blocks(read_corpus(cfg.eval.holdout_set), inputs.tokenizer, cfg.labels.context_length, name=f"holdout set {cfg.eval.holdout_set}")
    return torch.tensor([block.input_ids for block in blocks])


def memorization_record(result: PhaseResult) -> dict:
    """What the summary keeps of a memorization-aware phase."""
    fit = result.fit
    return {
        "stop_level": fit.stop_level,
        "stopped_early": fit.stopped_early,
        "memorization": fit.memorization,  # [step, mean g, blocks selected] per re-scoring
        "blocks_touched": sum(fit.touched),  # over all steps (a block ascended on twice counts twice)
    }


class SGA(GradientAscent):
    name: ClassVar[str] = "sga"
    what: ClassVar[str] = "selective gradient ascent on the memorized forget blocks"

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        self.holdout = holdout_ids(self.cfg, inputs) if "unlearn" in todo else None

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        m = self.cfg.memorization
        selection = MemorizationSelection(m.prefix_length, m.select_threshold, m.stop_level, m.rescore_every, self.holdout, self.cfg.eval.batch_size)
        return Phase("unlearn", inputs.baseline, self.cfg.unlearn, self.objective(), selection=selection)

    def summary(self, result: PhaseResult) -> TrainingSummary:
        base = super().summary(result)
        return TrainingSummary(base.method, base.steps, base.train_seconds, base.workers, base.throughput, {**base.details, **memorization_record(result)})

    @classmethod
    def describe(cls, name: str, s: dict) -> str:
        trace = s.get("memorization") or []
        last = f"; mean g {trace[0][1]:.2f} → {trace[-1][1]:.2f} (stop level {s['stop_level']:.2f})" if trace and s.get("stop_level") is not None else ""
        return f"{super().describe(name, s)}{last}, {s.get('blocks_touched', 0)} block updates"
