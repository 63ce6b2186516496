"""Ground truth: materialized fp32 logits, plain PyTorch. Memory O(N·V); for tests and small runs.

Semantics (docs/kernel.md): b = hb·Wbᵀ, r = hr·Wrᵀ in fp32; for each valid (≥ 0) forbidden id
of a row, b is replaced by the mean of that row's ORIGINAL baseline logits; mixed = b − α·relu(r − b);
label = first (smallest-id) argmax; stats are logsumexp and max of `mixed` per row and α.
"""

from __future__ import annotations

import torch

from kernels.chunked import row_mean


def baseline_and_excess(hb, wb, hr, wr, forbidden=None):
    """(b, relu(r − b)) as fp32 [N, V], with the forbidden ids' b already replaced by the row mean.

    The mixed logits for α are `b − α·excess`; tests use this to check labels by value.
    """
    b = hb.float() @ wb.float().T  # [N, V]
    r = hr.float() @ wr.float().T
    if forbidden is not None and forbidden.numel():
        mean = row_mean(b.sum(dim=1, keepdim=True), b.shape[1]).expand_as(forbidden)  # torch's CUDA mean: 1 ulp off
        valid = forbidden >= 0
        rows = torch.arange(b.shape[0], device=b.device).unsqueeze(1).expand_as(forbidden)
        b = b.clone()
        b[rows[valid], forbidden[valid].long()] = mean[valid]  # duplicates write the same value
    return b, torch.relu(r - b)


def generic_labels_reference(hb, wb, hr, wr, alphas, forbidden=None, *, return_stats=False):
    b, excess = baseline_and_excess(hb, wb, hr, wr, forbidden)
    labels, lse, best = [], [], []
    for alpha in alphas:
        mixed = b - alpha * excess
        value, index = mixed.max(dim=1)  # first maximal index: ties go to the smallest id
        labels.append(index)
        if return_stats:
            lse.append(torch.logsumexp(mixed, dim=1))
            best.append(value)
    out = torch.stack(labels, dim=1)
    if return_stats:
        return out, torch.stack(lse, dim=1), torch.stack(best, dim=1)
    return out
