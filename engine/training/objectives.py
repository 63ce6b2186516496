"""What a training step minimizes: an objective on one micro-batch, the seam between methods and backends.

A micro-batch is `(input_ids [b, L], targets)`, `targets` being whatever the phase trains toward, one row
per block: next-token labels in the Hugging Face convention (`targets[t]` is the target of the output at
`t - 1`, -100 = ignored) — the input ids themselves when no teacher streams anything — or a teacher's
per-block values (NPO: the reference model's log-probability of the block; NaN marks a padding row). A
row may bundle a forget block with a retain block, `input_ids [b, 2, L]`: the backends run the model on
both and hand the objective logits `[b, 2, L, V]`; when the phase holds a frozen reference model (a KL
retain term), its logits on the retain rows come along as `reference [b, L, V]`. A step's loss is the
sum of `loss_sum` over every rank's micro-batches divided by the
sum of their `units`, so N ranks × micro-batch b train exactly like 1 rank × N·b, whatever the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.models import IGNORE_INDEX


class Objective(Protocol):
    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        """What the step's loss is averaged over (trained tokens, sequences, ...)."""
        ...

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The micro-batch's loss summed over its units (a differentiable scalar); `reference`: the frozen
        reference's logits on the retain rows, when the phase has one."""
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


def kl_sums(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, Σ over next-token positions of KL(reference ‖ model): [b, L, V] twice → [b]."""
    log_p = F.log_softmax(logits[:, :-1].float(), -1)
    log_q = F.log_softmax(reference[:, :-1].float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum((-1, -2))


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its next-token labels, and how many there are. [b, L, V], [b, L] → [b], [b]."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


class NextTokenLoss:
    """Token-weighted cross-entropy toward next-token labels: reinforce, WHP's unlearn, pretraining."""

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return causal_lm_loss_sum(logits, targets)[0]


NEXT_TOKEN = NextTokenLoss()


@dataclass(frozen=True)
class RetainedNextTokenLoss:
    """Next-token cross-entropy toward a teacher's labels on the forget row of each bundle, plus w · the retain
    row's NLL (or, with the reference's logits, KL(reference ‖ model)): WHP's generic labels kept from
    costing general text. Both are sums over tokens averaged over the trained forget tokens, so with
    rows of equal length this is mean label CE + w · mean retain term; a padding row (no labels) adds nothing."""

    retain_weight: float

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        forget, _ = causal_lm_loss_sum(logits[:, 0], targets)
        valid = (targets[:, 1:] != IGNORE_INDEX).any(-1)
        positions = input_ids.shape[-1] - 1
        return forget + self.retain_weight * positions * _retain_sum(logits, input_ids, valid, reference)


class AscentLoss:
    """Gradient ascent: the negated next-token cross-entropy of the forget text (rows without labels count nothing)."""

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return trained_tokens(targets)

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return -causal_lm_loss_sum(logits, targets)[0]


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

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        forget, _ = causal_lm_loss_sum(logits[:, 0], targets[:, 0])
        if self.retain_kl:
            valid = (targets[:, 1, 1:] != IGNORE_INDEX).any(-1)
            retain = torch.where(valid, kl_sums(logits[:, 1], reference), 0.0).sum()
        else:
            retain, _ = causal_lm_loss_sum(logits[:, 1], targets[:, 1])
        return -forget + self.retain_weight * retain


def _retain_sum(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Σ over valid bundled rows of the retain block's mean next-token NLL — or, given the reference's
    logits, its mean KL(reference ‖ model) — (0 for unbundled rows)."""
    if input_ids.dim() == 2:
        return logits.new_zeros(())
    positions = input_ids.shape[-1] - 1
    per_row = kl_sums(logits[:, 1], reference) if reference is not None else -sequence_log_probs(logits[:, 1], input_ids[:, 1])[0]
    return torch.where(valid, per_row / positions, 0.0).sum()


def _forget_part(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (logits[:, 0], input_ids[:, 0]) if input_ids.dim() == 3 else (logits, input_ids)


@dataclass(frozen=True)
class NPOLoss:
    """NPO (Zhang et al. 2024), per sequence: −(2/β)·log σ(−β·(log p_θ(y) − log p_ref(y))), with a retain
    term (w · mean retain NLL, or KL to the reference when the backend hands its logits) on bundled rows.
    Targets: [b, 1] reference log-probabilities, NaN on padding."""

    beta: float
    retain_weight: float = 0.0

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return int((~targets[:, 0].isnan()).sum())

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        valid = ~targets[:, 0].isnan()
        log_probs, _ = sequence_log_probs(*_forget_part(logits, input_ids))
        reference_log_probs = torch.where(valid, targets[:, 0].to(log_probs.dtype), 0.0)
        npo = -(2 / self.beta) * F.logsigmoid(-self.beta * (log_probs - reference_log_probs))
        return torch.where(valid, npo, 0.0).sum() + self.retain_weight * _retain_sum(logits, input_ids, valid, reference)


@dataclass(frozen=True)
class SimNPOLoss:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised, per sequence:
    −(2/β)·log σ(−(β/|y|)·log p_θ(y) − γ), with NPO's retain term. Targets: the input ids (-100 on padding)."""

    beta: float
    gamma: float
    retain_weight: float = 0.0

    def units(self, input_ids: torch.Tensor, targets: torch.Tensor) -> int:
        return int(self._valid(targets).sum())

    @staticmethod
    def _valid(targets: torch.Tensor) -> torch.Tensor:
        forget = targets[:, 0] if targets.dim() == 3 else targets
        return (forget[:, 1:] != IGNORE_INDEX).any(-1)

    def loss_sum(self, logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        valid = self._valid(targets)
        forget_logits, _ = _forget_part(logits, input_ids)
        log_probs, counts = sequence_log_probs(forget_logits, targets[:, 0] if targets.dim() == 3 else targets)
        simnpo = -(2 / self.beta) * F.logsigmoid(-self.beta * log_probs / counts.clamp(min=1) - self.gamma)
        return torch.where(valid, simnpo, 0.0).sum() + self.retain_weight * _retain_sum(logits, input_ids, valid, reference)
