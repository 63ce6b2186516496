"""Facts about the device the kernels run on, shared by the engine, `plan` and the profiler."""

from __future__ import annotations

import contextlib

import torch


def nvtx_range(name: str):
    """An NVTX range on CUDA builds (visible in Nsight Systems), a no-op elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()
