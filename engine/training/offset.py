"""Offset (δ-) unlearning in the trainer: train o′ so that the ensemble z = z_M + α·(z_o′ − z_o) forgets.

The trainer holds M (the model being unlearned) and o frozen beside o′, which it trains from o's weights, so
the ensemble starts as M exactly. A micro-batch's `TokenScores` come from `kernels.offset_token_stats` on the
three models' final hidden states and LM heads: no [tokens × vocab] logits of any of them exist, and the
objective is the direct method's own.

Under ZeRO-3, o′'s head weight is partitioned and the kernel uses it outside lm_head's forward. `OffsetHead`
makes the kernel call a module's forward and registers the weight as that module's external parameter
(`deepspeed.zero.register_external_parameter`), so DeepSpeed gathers it for that forward and again for its
backward, and its gradient reaches the partitions like any other's. M's and o's heads never change: each rank
gathers them once per phase into full copies (vocab × width each, beside 1/N of each model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from engine.models import check_head_gives_logits, final_hidden_states, head_weight, lm_head_weights
from engine.offset_model import OffsetRecord
from engine.training.objectives import TokenScores


@dataclass(frozen=True)
class OffsetEnsemble:
    """What a phase of offset unlearning trains: o′ (the job's `init` is o) in the ensemble with M and o."""

    baseline: Path  # M: the model being unlearned, frozen, never differentiated
    small: Path  # o: a smaller model of M's vocabulary, frozen; o′ starts from it
    alpha: float  # z = z_M + α·(z_o′ − z_o)
    retain_kl: bool = False  # the retain term is KL(M ‖ ensemble) on the retain rows (else their NLL)

    def record(self) -> OffsetRecord:
        """What the artifact's offset.json says: the frozen models and α; no forget data."""
        return OffsetRecord(self.baseline, self.small, self.alpha)


class OffsetHead(torch.nn.Module):
    """o′ with the ensemble's per-token statistics as its forward, so that under ZeRO-3 its head weight is
    gathered where the kernel uses it (see the module docstring). Saved, it is the offset artifact."""

    def __init__(self, trained: torch.nn.Module, ensemble: OffsetEnsemble):
        super().__init__()
        self.trained, self.ensemble = trained, ensemble
        weight = head_weight(trained)
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def forward(self, rows: torch.Tensor, big_hidden: torch.Tensor, big_head: torch.Tensor, small_hidden: torch.Tensor, small_head: torch.Tensor, targets: torch.Tensor, kl: bool):
        """(log_probs [N], kl [N] | None) of the N = rows × (L − 1) next-token positions of `rows [R, L]`."""
        hidden = final_hidden_states(self.trained, rows)[:, :-1].flatten(0, 1)
        with torch.autocast(rows.device.type, enabled=False):  # the kernel keeps its own fp32 accumulation
            return kernels.offset_token_stats(big_hidden, big_head, small_hidden, small_head, hidden, head_weight(self.trained), targets, self.ensemble.alpha, kl=kl)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, **kwargs) -> None:
        """The offset artifact: o′ as a Hugging Face model directory and offset.json naming M, o and α."""
        if state_dict is not None:  # DeepSpeed's consolidated state dict names o′'s tensors under `trained.`
            state_dict = {name.removeprefix("trained."): tensor for name, tensor in state_dict.items()}
        self.trained.save_pretrained(path, state_dict=state_dict, **kwargs)
        self.ensemble.record().write(path)


class OffsetScorer:
    """The ensemble's `TokenScores`: M's and o's final hidden states without gradients, o′'s through `OffsetHead`
    (the `model` a backend trains), the three heads into the kernel."""

    def __init__(self, baseline: torch.nn.Module, small: torch.nn.Module, ensemble: OffsetEnsemble):
        """`baseline`, `small`: M and o, whole or ZeRO-3 engines (every rank builds this together)."""
        self.baseline, self.small, self.ensemble = baseline, small, ensemble
        with lm_head_weights(baseline, small) as weights:  # full copies only where they were partitioned
            self.heads = [weight.detach().clone() if hasattr(weight, "ds_id") else weight.detach() for weight in weights]
        probe = torch.arange(min(8, self.heads[0].shape[0]), device=self.heads[0].device)[None]
        check_head_gives_logits(baseline, probe, "baseline")
        check_head_gives_logits(small, probe, "offset.small")

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
        length = input_ids.shape[-1]
        rows = input_ids.reshape(-1, length)
        targets = labels.reshape(-1, length)[:, 1:].flatten()
        with torch.no_grad():
            big_hidden, small_hidden = (final_hidden_states(frozen, rows)[:, :-1].flatten(0, 1) for frozen in (self.baseline, self.small))
        kl = self.ensemble.retain_kl and input_ids.dim() == 3  # KL to M on the retain rows of bundles
        log_probs, divergence = model(rows, big_hidden, self.heads[0], small_hidden, self.heads[1], targets, kl)
        shape = (*input_ids.shape[:-1], length - 1)
        return TokenScores(log_probs.view(shape), divergence.view(shape)[:, 1] if kl else None)
