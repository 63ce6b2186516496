"""Dispatch of `generic_labels` to its implementations (see ../shared/design/kernel.md)."""

from __future__ import annotations

from typing import Sequence

import torch

from kernels.reference import generic_labels_reference

IMPLS = {"reference": generic_labels_reference}


def generic_labels(
    hb: torch.Tensor,
    wb: torch.Tensor,
    hr: torch.Tensor,
    wr: torch.Tensor,
    alphas: Sequence[float],
    forbidden: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    return_stats: bool = False,
):
    """Hard generic labels for N aligned positions.

    hb, hr: [N, H] LM-head inputs of the baseline (on the translated text, gathered through the
    position map) and of the reinforced model (on the original text); wb, wr: [V, H] LM-head weights;
    forbidden: int [N, K] token ids padded with -1, whose baseline logit becomes the row mean.
    Returns int64 [N, len(alphas)] labels (ties → smallest id), plus (logsumexp, max) of the mixed
    logits, each fp32 [N, len(alphas)], when `return_stats`.
    """
    if hb.shape != hr.shape or hb.dim() != 2:
        raise ValueError(f"hb and hr must both be [N, H], got {tuple(hb.shape)} and {tuple(hr.shape)}")
    if wb.shape != wr.shape or wb.shape[1] != hb.shape[1]:
        raise ValueError(f"wb and wr must both be [V, {hb.shape[1]}], got {tuple(wb.shape)} and {tuple(wr.shape)}")
    if not alphas or any(a <= 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {list(alphas)}")
    if forbidden is not None and (forbidden.dim() != 2 or forbidden.shape[0] != hb.shape[0]):
        raise ValueError(f"forbidden must be [N, K], got {tuple(forbidden.shape)}")
    name = "reference" if impl == "auto" else impl
    if name not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from auto, {', '.join(IMPLS)}")
    return IMPLS[name](hb, wb, hr, wr, list(alphas), forbidden, return_stats=return_stats)
