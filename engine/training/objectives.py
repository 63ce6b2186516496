"""What a training step minimizes: an objective on one micro-batch, the seam between methods and backends.

A micro-batch is `(input_ids [b, L], targets)`, `targets` being whatever the phase trains toward, one row
per block: next-token labels in the Hugging Face convention (`targets[t]` is the target of the output at
`t - 1`, -100 = ignored) — the input ids themselves when no teacher streams anything — or a teacher's
per-block values (NPO: the reference model's log-probability of the block; NaN marks a padding row). A
row may bundle a forget block with a retain block, `input_ids [b, 2, L]`.

An objective never sees logits. It names the next-token labels it scores (`labels`), the backend scores
them (`TokenScores`: per-position log-probabilities, and the KL to a frozen reference on the retain rows
when the phase has one), and the objective turns the scores into a loss. So one loss function serves
every way of scoring: a model's own logits (`scores_from_logits`), or offset unlearning's ensemble of
three models, whose logits are never materialized (`engine.training.offset`). A step's loss is the sum of
`loss_sum` over every rank's micro-batches divided by the sum of their `units`, so N ranks × micro-batch b
train exactly like 1 rank × N·b, whatever the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.models import IGNORE_INDEX


@dataclass(frozen=True)
class TokenScores:
    """What an objective sees of the model on one micro-batch of `input_ids [b, (k,) L]`."""

    log_probs: torch.Tensor  # [b, (k,) L-1] fp32: log p(labels[t+1] | x_≤t), 0 where the label is ignored
    retain_kl: torch.Tensor | None = None  # [b, L-1] fp32: KL(reference ‖ model) per position on the retain rows (a KL retain term)


class Objective(Protocol):
    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        """What the step's loss is averaged over (trained tokens, sequences, ...)."""
        ...

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The next-token labels it scores, int64 shaped like `input_ids` (HF convention, -100 ignored)."""
        ...

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss summed over its units (a differentiable scalar)."""
        ...


def next_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t+1] | x_≤t) per position in fp32, 0 where ignored: [..., L, V], [..., L] → [..., L-1]."""
    targets = labels[..., 1:]
    nll = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def next_token_kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) of the next-token distributions per position: [b, L, V] twice → [b, L-1]."""
    log_p = F.log_softmax(logits[:, :-1].float(), -1)
    log_q = F.log_softmax(reference[:, :-1].float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def scores_from_logits(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None) -> TokenScores:
    """A model's `TokenScores` from its logits [b, (k,) L, V]; `reference`: a frozen model's logits on the
    retain rows [b, L, V], for a KL retain term."""
    return TokenScores(next_token_log_probs(logits, labels), next_token_kl(logits[:, 1], reference) if reference is not None else None)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy in the HF convention, and the number of counted tokens."""
    return -next_token_log_probs(logits, labels).sum(), trained_tokens(labels)


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

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return targets

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -scores.log_probs.sum()


NEXT_TOKEN = NextTokenLoss()


def _with_retain_ids(forget_labels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The labels of a row, and on bundled rows the retain block's own next tokens beside them: what a
    per-bundle retain term (`_retain_sum`) scores."""
    return forget_labels if input_ids.dim() == 2 else torch.stack([forget_labels, input_ids[:, 1]], dim=1)


def _retain_sum(scores: TokenScores, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ over valid bundled rows of the retain block's mean next-token NLL — or, when the scores carry it,
    its mean KL(reference ‖ model) — (0 for unbundled rows)."""
    if input_ids.dim() == 2:
        return scores.log_probs.new_zeros(())
    positions = input_ids.shape[-1] - 1
    per_row = scores.retain_kl.sum(-1) if scores.retain_kl is not None else -scores.log_probs[:, 1].sum(-1)
    return torch.where(valid, per_row / positions, 0.0).sum()


def _forget_part(per_row: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return per_row[:, 0] if input_ids.dim() == 3 else per_row


@dataclass(frozen=True)
class RetainedNextTokenLoss:
    """Next-token cross-entropy toward a teacher's labels on the forget row of each bundle, plus w · the retain
    row's NLL (or, with a frozen reference, KL(reference ‖ model)): WHP's generic labels kept from
    costing general text. Both are sums over tokens averaged over the trained forget tokens, so with
    rows of equal length this is mean label CE + w · mean retain term; a padding row (no labels) adds nothing."""

    retain_weight: float

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _with_retain_ids(targets, input_ids)

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        forget = -_forget_part(scores.log_probs, input_ids).sum()
        valid = (targets[:, 1:] != IGNORE_INDEX).any(-1)
        positions = input_ids.shape[-1] - 1
        return forget + self.retain_weight * positions * _retain_sum(scores, input_ids, valid)


class AscentLoss:
    """Gradient ascent: the negated next-token cross-entropy of the forget text (rows without labels count nothing)."""

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return targets

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return scores.log_probs.sum()


@dataclass(frozen=True)
class GradDiffLoss:
    """GradDiff on bundled rows: ascend on the forget block, descend on its retain block — its NLL, or with
    `retain_kl` the KL(reference ‖ model) of its next-token distributions (the "KL" baseline).

    Both sums are over tokens and averaged over the forget tokens: blocks all have `context_length` tokens,
    so this is −mean forget NLL + w · mean retain term."""

    retain_weight: float
    retain_kl: bool = False

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets[:, 0])

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return targets

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        forget = -scores.log_probs[:, 0].sum()
        if self.retain_kl:
            valid = (targets[:, 1, 1:] != IGNORE_INDEX).any(-1)
            retain = torch.where(valid, scores.retain_kl.sum(-1), 0.0).sum()
        else:
            retain = -scores.log_probs[:, 1].sum()
        return -forget + self.retain_weight * retain


@dataclass(frozen=True)
class NPOLoss:
    """NPO (Zhang et al. 2024), per sequence: −(2/β)·log σ(−β·(log p_θ(y) − log p_ref(y))), with a retain
    term (w · mean retain NLL, or KL to the reference when the phase holds one) on bundled rows.
    Targets: [b, 1] reference log-probabilities, NaN on padding."""

    beta: float
    retain_weight: float = 0.0

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return int((~targets[:, 0].isnan()).sum())

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return input_ids  # the forget text itself (and the retain block's, bundled)

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = ~targets[:, 0].isnan()
        log_probs = _forget_part(scores.log_probs, input_ids).sum(-1)
        reference_log_probs = torch.where(valid, targets[:, 0].to(log_probs.dtype), 0.0)
        npo = -(2 / self.beta) * F.logsigmoid(-self.beta * (log_probs - reference_log_probs))
        return torch.where(valid, npo, 0.0).sum() + self.retain_weight * _retain_sum(scores, input_ids, valid)


@dataclass(frozen=True)
class SimNPOLoss:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised, per sequence:
    −(2/β)·log σ(−(β/|y|)·log p_θ(y) − γ), with NPO's retain term. Targets: the input ids (-100 on padding)."""

    beta: float
    gamma: float
    retain_weight: float = 0.0

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return int((self._forget_labels(targets)[:, 1:] != IGNORE_INDEX).any(-1).sum())

    @staticmethod
    def _forget_labels(targets: torch.Tensor) -> torch.Tensor:
        return targets[:, 0] if targets.dim() == 3 else targets

    def labels(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _with_retain_ids(self._forget_labels(targets), input_ids)

    def loss_sum(self, scores: TokenScores, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        counted = self._forget_labels(targets)[:, 1:] != IGNORE_INDEX
        valid, counts = counted.any(-1), counted.sum(-1)
        log_probs = _forget_part(scores.log_probs, input_ids).sum(-1)
        simnpo = -(2 / self.beta) * F.logsigmoid(-self.beta * log_probs / counts.clamp(min=1) - self.gamma)
        return torch.where(valid, simnpo, 0.0).sum() + self.retain_weight * _retain_sum(scores, input_ids, valid)
