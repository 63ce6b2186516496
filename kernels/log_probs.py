"""Per-token log-probabilities of given targets from LM-head inputs, without [N, V] logits.

log p(y | h) = h·w_y − logsumexp_v h·w_v. `token_log_probs_reference` materializes the fp32 logits (the
ground truth); `token_log_probs` runs the vocabulary in column chunks with a running logsumexp
(`RunningLogSumExp`, shared with the offset kernel's chunked path), so its extra memory is O(N·chunk):
what NPO's reference teacher uses to score whole blocks of a large vocabulary.
"""

from __future__ import annotations

import torch

from kernels.chunked import NEG_INF, default_chunk


class RunningLogSumExp:
    """Per-row logsumexp over column chunks seen one at a time, rescaled online as the running max grows.

    With `weighted`, it also keeps Σ_v exp(x_v − max)·w_v for a second [N, chunk] quantity w given with each
    chunk, so `softmax_mean()` = E_{softmax(x)}[w] comes out of the same single pass.
    """

    def __init__(self, n: int, device: torch.device, weighted: bool = False):
        self.max = torch.full((n,), NEG_INF, device=device)
        self.sum = torch.zeros(n, device=device)
        self.weighted_sum = torch.zeros(n, device=device) if weighted else None

    def add(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        new_max = torch.maximum(self.max, logits.max(1).values)
        rescale = (self.max - new_max).exp()  # 0 on the first chunk (the running max is -inf)
        exp = (logits - new_max[:, None]).exp_()
        self.sum.mul_(rescale).add_(exp.sum(1))
        if self.weighted_sum is not None:
            self.weighted_sum.mul_(rescale).add_(exp.mul_(weights).sum(1))
        self.max = new_max

    def logsumexp(self) -> torch.Tensor:
        return self.max + self.sum.log()

    def log_softmax(self, values: torch.Tensor) -> torch.Tensor:
        """values − logsumexp, the max subtracted first: exact at logits of 1e4, where max + log(sum) rounds."""
        return values - self.max - self.sum.log()

    def softmax_mean(self) -> torch.Tensor:
        return self.weighted_sum / self.sum


def token_log_probs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, H], [V, H], [N] → fp32 [N], through the full fp32 logits."""
    logits = hidden.float() @ weight.float().T
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """[N, H], [V, H], [N] → fp32 [N], one pass over the vocabulary in column chunks."""
    h = hidden.float()
    n, vocab = h.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk(n, h.shape[1], weight.dtype != torch.float32)
    normalizer = RunningLogSumExp(n, h.device)
    for start in range(0, vocab, chunk):
        normalizer.add(h @ weight[start : start + chunk].float().T)
    target_logits = (h * weight[targets].float()).sum(1)
    return normalizer.log_softmax(target_logits)
