"""What a training step minimizes: an objective on one micro-batch, the seam between methods and backends.

A micro-batch is `(input_ids [b, L], targets)`, `targets` being whatever the phase trains toward, one row
per block: next-token labels in the Hugging Face convention (`targets[t]` is the target of the output at
`t - 1`, -100 = ignored) — the input ids themselves when no teacher streams anything — or a teacher's
per-block values. A step's loss is the sum of `loss_sum` over every rank's micro-batches divided by the
sum of their `units`, so N ranks × micro-batch b train exactly like 1 rank × N·b, whatever the objective.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from engine.models import IGNORE_INDEX


class Objective(Protocol):
    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        """What the step's loss is averaged over (trained tokens, sequences, ...)."""
        ...

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss summed over its units (a differentiable scalar)."""
        ...


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy in the HF convention, and the number of counted tokens."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def memorization_scores(logits: torch.Tensor, input_ids: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Per row, the fraction of tokens after the first `prefix_length` that are the argmax next token given
    the true text before them (teacher forcing): memorization accuracy, the score g(x) that the
    memorization-aware methods select and stop by and the evaluation suite reports. [b, T, V], [b, T] → [b]."""
    predicted = logits[:, prefix_length - 1 : -1].argmax(-1)
    return (predicted == input_ids[:, prefix_length:].to(predicted.device)).float().mean(-1)


def trained_tokens(targets: torch.Tensor) -> int:
    """Positions with a next-token label (all but the first of each block and the ignored ones)."""
    return int((targets[:, 1:] != IGNORE_INDEX).sum())


class NextTokenLoss:
    """Token-weighted cross-entropy toward next-token labels: reinforce, WHP's unlearn, pretraining."""

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss_sum(logits, targets)[0]


NEXT_TOKEN = NextTokenLoss()
