"""Dispatch of `generic_labels` to its implementations (see docs/kernel.md).

- `reference`: materialized fp32 logits (kernels/reference.py), the ground truth;
- `chunked`: PyTorch over vocab chunks with running reductions (kernels/chunked.py), the CPU default;
- `triton`: the fused kernel (kernels/triton_mixing.py), the CUDA default; on CPU tensors it runs under
  the Triton interpreter (TRITON_INTERPRET=1 set before the first import of the kernel).
Triton is imported lazily: importing `kernels` needs neither triton nor a GPU.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from kernels.chunked import generic_labels_chunked
from kernels.reference import generic_labels_reference

IMPL_NAMES = ("reference", "chunked", "triton")


def _triton_impl():
    from kernels.triton_mixing import generic_labels_triton

    return generic_labels_triton


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (the triton path on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` names on tensors of `device` ("auto": triton on CUDA, chunked otherwise);
    a ValueError for an unknown name, or for triton on CPU without the interpreter."""
    if impl not in ("auto",) + IMPL_NAMES:
        raise ValueError(f"unknown impl {impl!r}; choose from auto, {', '.join(IMPL_NAMES)}")
    name = ("triton" if device.type == "cuda" else "chunked") if impl == "auto" else impl
    if name == "triton" and device.type == "cpu" and not interpreter_requested():
        raise ValueError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the kernel module is first imported, or use impl='chunked'"
        )
    return name


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
    impl: "auto" (triton on CUDA tensors, chunked otherwise), "reference", "chunked" or "triton".
    """
    alphas = _check(hb, wb, hr, wr, alphas, forbidden)
    name = resolve_impl(impl, hb.device)
    if forbidden is not None and forbidden.shape[1] == 0:
        forbidden = None

    n, a_count = hb.shape[0], len(alphas)
    if n == 0:
        labels = torch.empty((0, a_count), dtype=torch.long, device=hb.device)
        if return_stats:
            empty = torch.empty((0, a_count), dtype=torch.float32, device=hb.device)
            return labels, empty, empty.clone()
        return labels

    if name == "reference":
        fn = generic_labels_reference
    elif name == "chunked":
        fn = generic_labels_chunked
    else:
        fn = _triton_impl()
    return fn(hb, wb, hr, wr, alphas, forbidden, return_stats=return_stats)


def _check(hb, wb, hr, wr, alphas, forbidden) -> list[float]:
    if hb.dim() != 2 or hb.shape != hr.shape:
        raise ValueError(f"hb and hr must both be [N, H], got {tuple(hb.shape)} and {tuple(hr.shape)}")
    if wb.dim() != 2 or wb.shape != wr.shape or wb.shape[1] != hb.shape[1]:
        raise ValueError(f"wb and wr must both be [V, {hb.shape[1]}], got {tuple(wb.shape)} and {tuple(wr.shape)}")
    if wb.shape[0] == 0:
        raise ValueError("the vocabulary is empty (wb is [0, H])")
    tensors = {"hb": hb, "wb": wb, "hr": hr, "wr": wr}
    if forbidden is not None:
        tensors["forbidden"] = forbidden
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {', '.join(f'{k}: {v}' for k, v in devices.items())}")
    if hb.dtype != hr.dtype or wb.dtype != wr.dtype:
        raise ValueError(f"dtype mismatch: hb {hb.dtype} vs hr {hr.dtype}, wb {wb.dtype} vs wr {wr.dtype}")
    if not hb.is_floating_point() or not wb.is_floating_point():
        raise ValueError(f"hidden states and weights must be floating point, got {hb.dtype} and {wb.dtype}")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive finite numbers, got {alphas}")
    if forbidden is not None:
        if forbidden.dim() != 2 or forbidden.shape[0] != hb.shape[0]:
            raise ValueError(f"forbidden must be [N, K] with N = {hb.shape[0]}, got {tuple(forbidden.shape)}")
        if forbidden.dtype == torch.bool or forbidden.is_floating_point() or forbidden.is_complex():
            raise ValueError(f"forbidden must hold integer token ids, got {forbidden.dtype}")
        if forbidden.numel():
            low, high = int(forbidden.min()), int(forbidden.max())
            if low < -1 or high >= wb.shape[0]:
                raise ValueError(f"forbidden ids must be in [0, {wb.shape[0]}) or -1 (padding), got range [{low}, {high}]")
    return alphas
