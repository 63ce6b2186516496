"""Memorization-aware training: which forget blocks a step may ascend on, and when to stop.

The score of a block is g(x), its greedy next-token accuracy after a prefix under the model being trained
(`objectives.memorization_scores`). Every `every` steps (an epoch by default) the trainer re-scores its
blocks — each rank its contiguous share, gathered by a sum — so every rank takes the same decision
whatever the world size: ascend only on the blocks with g ≥ `threshold` plus the single most memorized
one (threshold 0: all of them), and stop once the mean g falls below `stop_level`. Without a given stop
level, it is the mean g of the initial model on unseen text of the same kind (`holdout_ids`), scored at
step 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from engine.models import IGNORE_INDEX
from engine.training.objectives import memorization_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    selected: torch.Tensor  # bool [n_blocks]: the blocks steps may ascend on until the next re-scoring
    mean_score: float  # mean g over the scored blocks
    stop: bool


@dataclass(frozen=True)
class MemorizationSelection:
    prefix_length: int
    threshold: float  # ascend on blocks with g >= threshold, and on the most memorized one
    stop_level: float | None  # stop once the mean g < this; None: the initial model's mean g on holdout_ids
    every: int = 0  # steps between re-scorings (0: every epoch)
    holdout_ids: torch.Tensor | None = None  # [n, L] unseen blocks for the default stop level
    batch_size: int = 8  # blocks per scoring forward pass

    def scores(self, backend, input_ids: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """g of each block in `block_ids` (forget part of bundled rows), the same tensor on every rank."""
        share = math.ceil(block_ids.numel() / backend.world_size)
        mine = block_ids[backend.rank * share : (backend.rank + 1) * share]
        local = torch.zeros(block_ids.numel(), dtype=torch.float64)
        for first in range(0, share, self.batch_size):  # every rank runs as many forwards (ZeRO-3 gathers)
            chunk = mine[first : first + self.batch_size]
            rows = input_ids[chunk if chunk.numel() else block_ids[:1]]
            rows = rows[:, 0] if rows.dim() == 3 else rows
            g = memorization_scores(backend.logits(rows), rows, self.prefix_length).cpu()
            start = backend.rank * share + first
            local[start : start + chunk.numel()] = g[: chunk.numel()].double()
        return torch.tensor(backend.all_reduce(*local.tolist()), dtype=torch.float64)

    def default_stop_level(self, backend) -> float:
        if self.stop_level is not None:
            return self.stop_level
        return float(self.scores(backend, self.holdout_ids, torch.arange(self.holdout_ids.shape[0])).mean())

    def decide(self, scores: torch.Tensor, block_ids: torch.Tensor, n_blocks: int, stop_level: float) -> Decision:
        chosen = block_ids[scores >= self.threshold]
        most = block_ids[scores.argmax()]
        selected = torch.zeros(n_blocks, dtype=torch.bool)
        selected[chosen] = True
        selected[most] = True
        mean = float(scores.mean())
        return Decision(selected, mean, mean < stop_level)


class Selector:
    """`fit`'s side of a `MemorizationSelection`: re-scores on schedule, masks the targets of unselected
    blocks (they count nothing), and records in the `FitResult` what it decided, so a resumed run decides alike."""

    def __init__(self, selection: MemorizationSelection, backend, input_ids: torch.Tensor, schedule, result) -> None:
        self.selection, self.backend, self.input_ids, self.schedule, self.result = selection, backend, input_ids, schedule, result
        self.every = selection.every or schedule.steps_per_epoch
        self.selected = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        self.selected[torch.tensor(result.selected, dtype=torch.long)] = True

    def stop_before(self, step: int, desc: str) -> bool:
        """Re-score when due; True (logged) when the mean g has fallen below the stop level."""
        if step % self.every:
            return False
        result = self.result
        if result.stop_level is None:
            result.stop_level = self.selection.default_stop_level(self.backend)
        scores = self.selection.scores(self.backend, self.input_ids, self.schedule.train_ids)
        decision = self.selection.decide(scores, self.schedule.train_ids, self.input_ids.shape[0], result.stop_level)
        self.selected = decision.selected
        result.selected = decision.selected.nonzero().squeeze(1).tolist()
        result.memorization.append([step, decision.mean_score, len(result.selected)])
        result.stopped_early = decision.stop
        if decision.stop:
            log.info("%s: mean memorization %.3f below %.3f at step %d: stopping", desc, decision.mean_score, result.stop_level, step)
        return decision.stop

    def mask(self, chosen: torch.Tensor, targets: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
        """The targets with unselected blocks' rows ignored; records how many blocks the step touches."""
        self.result.touched.append(int(self.selected[step_ids].sum()))
        keep = self.selected[chosen].view(-1, *[1] * (targets.dim() - 1))
        return torch.where(keep, targets, torch.full_like(targets, IGNORE_INDEX))
