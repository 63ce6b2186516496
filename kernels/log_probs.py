"""Per-token log-probabilities of given targets from LM-head inputs, without [N, V] logits.

log p(y | h) = h·w_y − logsumexp_v h·w_v. `token_log_probs_reference` materializes the fp32 logits (the
ground truth); `token_log_probs` runs the vocabulary in column chunks with a running logsumexp, so its
extra memory is O(N·chunk): what NPO's reference teacher uses to score whole blocks of a large vocabulary.
"""

from __future__ import annotations

import torch

from kernels.chunked import default_chunk


def token_log_probs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, H], [V, H], [N] → fp32 [N], through the full fp32 logits."""
    logits = hidden.float() @ weight.float().T
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """[N, H], [V, H], [N] → fp32 [N], one pass over the vocabulary in column chunks."""
    h = hidden.float()
    n, vocab = h.shape[0], weight.shape[0]
    chunk = chunk_size or default_chunk(n, h.shape[1], weight.dtype != torch.float32)
    running_max = torch.full((n,), float("-inf"), device=h.device)
    running_sum = torch.zeros(n, device=h.device)
    for start in range(0, vocab, chunk):
        logits = h @ weight[start : start + chunk].float().T
        new_max = torch.maximum(running_max, logits.max(1).values)
        running_sum = running_sum * (running_max - new_max).exp() + (logits - new_max[:, None]).exp().sum(1)
        running_max = new_max
    target_logits = (h * weight[targets].float()).sum(1)
    return target_logits - running_max - running_sum.log()
