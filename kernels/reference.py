"""Ground truth: materialized fp32 logits, plain PyTorch. Memory O(N·V); for tests and small runs."""

from __future__ import annotations

import torch


def generic_labels_reference(hb, wb, hr, wr, alphas, forbidden=None, *, return_stats=False):
    b = hb.float() @ wb.float().T  # [N, V]
    r = hr.float() @ wr.float().T
    if forbidden is not None and forbidden.numel():
        row_mean = b.mean(dim=1, keepdim=True).expand_as(forbidden)
        valid = forbidden >= 0
        rows = torch.arange(b.shape[0], device=b.device).unsqueeze(1).expand_as(forbidden)
        b = b.clone()
        b[rows[valid], forbidden[valid].long()] = row_mean[valid]
    excess = torch.relu(r - b)
    labels, lse, best = [], [], []
    for alpha in alphas:
        mixed = b - alpha * excess
        value, index = mixed.max(dim=1)  # first maximal index: ties go to the smallest id
        labels.append(index)
        if return_stats:
            lse.append(torch.logsumexp(mixed, dim=1))
            best.append(value)
    out = torch.stack(labels, dim=1) if labels else torch.empty(0, dtype=torch.long)
    if return_stats:
        return out, torch.stack(lse, dim=1), torch.stack(best, dim=1)
    return out
