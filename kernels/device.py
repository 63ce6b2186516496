"""Facts about the devices and models the kernels run on, shared by `plan`, `bench-train` and the profiler.

Here rather than in the profiler so that run-time code never imports the profiler: one Llama shape table,
the dense peak TFLOP/s of known GPUs, and what each label and offset kernel allocates beyond its inputs.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from kernels.chunked import default_chunk
from kernels.offset import WORK_BUFFERS as OFFSET_WORK_BUFFERS


class LlamaDims(NamedTuple):
    """A Llama's dimensions as its Hugging Face config gives them."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


LLAMAS = {
    "llama2-7b": LlamaDims(4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": LlamaDims(5120, 40, 40, 40, 13824, 32000),
    "llama2-70b": LlamaDims(8192, 80, 64, 8, 28672, 32000),
    "llama3-8b": LlamaDims(4096, 32, 32, 8, 14336, 128256),
    "llama3-70b": LlamaDims(8192, 80, 64, 8, 28672, 128256),
}
# Dense peak TFLOP/s by input dtype, matched as a substring of torch.cuda.get_device_name(); first match wins.
# fp32 is the plain FP32 (non tensor core) rate: torch's default fp32 matmul precision is "highest".
PEAKS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # also GH200
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def nvtx_range(name: str):
    """An NVTX range on CUDA builds (visible in Nsight Systems), a no-op elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> float | None:
    """The override, else the table's dense peak for a CUDA device and dtype ("bf16", "fp16", "fp32"); None if unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[dtype] for key, peaks in PEAKS if key in name), None)


def extra_bytes_estimate(impl: str, n: int, h: int, v: int, dtype: torch.dtype, a: int, k: int) -> int:
    """What an impl allocates beyond its inputs, from its algorithm (an over- rather than under-estimate).

    reference: fp32 copies of the inputs (unless fp32) and six [N, V] fp32 at once (b, r, ReLU(r − b),
    α·ReLU, this α's mixed logits and the last α's; measured 375 MiB at N=512, V=32000 on CPU), one more
    when forbidden ids are written in. chunked: fp32 hidden states, three [N, chunk] fp32 buffers and the
    cast weight chunks (chunk width from kernels.chunked.default_chunk). triton: O(N)
    outputs and per-split partials (capped at 32 MiB there; 64 MiB here). Any other name: like reference.
    """
    fp32, outputs = 4, n * a * 8 * 3
    casts = 0 if dtype == torch.float32 else 2 * (n + v) * h * fp32
    if impl == "triton":
        return outputs + (64 << 20)
    if impl in ("chunked", "auto"):  # auto is chunked on CPU, triton on CUDA: the larger of the two
        c = min(v, default_chunk(n, h, dtype != torch.float32))
        return 2 * n * h * fp32 + 2 * c * h * fp32 + 3 * n * c * fp32 + 4 * n * fp32 + outputs + (64 << 20)
    return casts + (6 + (k > 0)) * n * v * fp32 + outputs


def offset_extra_bytes_estimate(impl: str, n: int, h: int, h_small: int, v: int, dtype: torch.dtype) -> int:
    """What `offset_token_stats` forward + backward allocates beyond its inputs (an over- rather than under-estimate).

    Every impl: fp32 [N] outputs and logsumexps, and the gradients of h_train and w_train in the input dtype.
    reference: fp32 copies of the inputs (unless fp32) and eight [N, V] fp32 at once (three heads' logits, z,
    two log-softmaxes and autograd's buffers; measured 1000 MiB at N=1024, V=32000 on CPU). chunked: fp32
    hidden states, the work buffers and three cast weight chunks (chunk width from kernels.chunked.default_chunk),
    fp32 dh. triton: fp32 dh partials (capped at 256 MiB there) and the fp32 dW accumulator. auto: the larger.
    """
    fp32, width = 4, h + 2 * h_small
    common = (n + v) * h_small * dtype.itemsize + 8 * n * fp32 + (64 << 20)
    if impl == "triton":
        return common + (256 << 20) + v * h_small * fp32
    if impl in ("chunked", "auto"):
        cast = dtype != torch.float32
        c = min(v, default_chunk(n, max(h, h_small), cast, buffers=OFFSET_WORK_BUFFERS, heads=3))
        chunked = common + (n * width * fp32 if cast else 0) + (OFFSET_WORK_BUFFERS * n + 3 * max(h, h_small)) * c * fp32
        chunked += n * h_small * fp32
        return chunked if impl == "chunked" else max(chunked, offset_extra_bytes_estimate("triton", n, h, h_small, v, dtype))
    casts = 0 if dtype == torch.float32 else (n + v) * width * fp32
    return common + casts + 8 * n * v * fp32
