"""Fused Triton kernel for generic-label mixing (docs/kernel.md).

Grid: (token blocks × vocab splits), in grouped order (GROUP_N token blocks share each split's W tiles
from L2, as in the Triton matmul tutorial). Each program sweeps its vocab split in BLOCK_V tiles: both
dot products over H in BLOCK_H steps with fp32 accumulators, the mix in registers, a running
(max, argmax) per α over the non-forbidden ids, a running row sum of b and (STATS) an online logsumexp
per α. It also records r at the row's forbidden ids that fall in its tiles. It writes O(N·SPLITS·A)
partials; `_reduce_splits` combines them in a fixed order (deterministic, no atomics) and
`settle_forbidden` (shared with the chunked path) folds in the forbidden ids with the final row mean.

Import this module only after deciding on the interpreter: TRITON_INTERPRET=1 must be set before the
@triton.jit below runs. Under the interpreter there is no autotuning, one small fixed config, and tiles
are cast to fp32 before tl.dot (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.chunked import row_mean, same_tensor, settle_forbidden
from kernels.mixing import interpreter_requested

try:
    from triton import knobs as _knobs

    INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # older triton
    INTERPRET = interpreter_requested()

MAX_ALPHAS = 16  # α count is a constexpr: one compiled variant per count
N_BUCKET_CAP = 16384  # autotune key: N rounded up to a power of two, capped, so a new N does not re-tune
PARTIALS_BUDGET_BYTES = 32 << 20  # cap on the per-split partials buffers
MIN_SPLIT_COLUMNS = 1024  # a split is at least this wide on GPU (amortizes the per-program set-up)
SPLIT_GRANULE = 256  # split widths are multiples of every BLOCK_V in the configs
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 32, "GROUP_N": 2}
INTERPRET_SPLITS = 3  # under the interpreter, exercise the cross-split reduction even at small V


@triton.jit
def _mixing_kernel(
    hb_ptr, hr_ptr, wb_ptr, wr_ptr, alpha_ptr, forb_ptr,
    part_max_ptr, part_arg_ptr, part_lse_ptr, part_sum_ptr, r_forb_ptr,
    N, V, H, V_PER_SPLIT, SPLITS, N_BUCKET,
    stride_hb, stride_hr, stride_wb, stride_wr, stride_f,
    A: tl.constexpr, A_PAD: tl.constexpr, K: tl.constexpr,
    SHARED_W: tl.constexpr, SAME_INPUTS: tl.constexpr, STATS: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped order: consecutive programs walk GROUP_N token blocks of one split, then the next split.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * SPLITS
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_s = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, A_PAD)[None, :]
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)

    best = tl.full([BLOCK_N, A_PAD], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_N, A_PAD], tl.int32) + v_start
    sum_exp = tl.zeros([BLOCK_N, A_PAD], tl.float32)  # Σ exp(mixed − best), best → 0 while it is -inf
    row_sum = tl.zeros([BLOCK_N], tl.float32)

    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_end
        offs_v64 = offs_v.to(tl.int64)
        acc_b = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        acc_r = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs_h
            if EVEN_H:
                x_mask = row_ok[:, None]
                w_mask = col_ok[None, :]
            else:
                x_mask = row_ok[:, None] & (h < H)[None, :]
                w_mask = (h < H)[:, None] & col_ok[None, :]
            xb = tl.load(hb_ptr + offs_n64[:, None] * stride_hb + h[None, :], mask=x_mask, other=0.0)
            wbt = tl.load(wb_ptr + offs_v64[None, :] * stride_wb + h[:, None], mask=w_mask, other=0.0)
            if FP32_DOT:
                xb = xb.to(tl.float32)
                wbt = wbt.to(tl.float32)
            acc_b = tl.dot(xb, wbt, acc_b, input_precision=DOT_PRECISION)
            if not SAME_INPUTS:
                xr = tl.load(hr_ptr + offs_n64[:, None] * stride_hr + h[None, :], mask=x_mask, other=0.0)
                if SHARED_W:
                    wrt = wbt
                else:
                    wrt = tl.load(wr_ptr + offs_v64[None, :] * stride_wr + h[:, None], mask=w_mask, other=0.0)
                if FP32_DOT:
                    xr = xr.to(tl.float32)
                    wrt = wrt.to(tl.float32)
                acc_r = tl.dot(xr, wrt, acc_r, input_precision=DOT_PRECISION)
        if SAME_INPUTS:
            acc_r = acc_b

        row_sum += tl.sum(acc_b, axis=1)  # columns past v_end loaded W = 0, so b = 0 there
        keep = row_ok[:, None] & col_ok[None, :]
        if K > 0:
            hit = tl.zeros([BLOCK_N, BLOCK_V], tl.int1)
            for k in tl.static_range(K):
                f = tl.load(forb_ptr + offs_n64 * stride_f + k, mask=row_ok, other=-1)
                hit = hit | (f[:, None] == offs_v[None, :])
            keep = keep & (hit == 0)
            if tl.max(hit.to(tl.int32)) > 0:  # rare: record r at the forbidden ids in this tile
                for k in tl.static_range(K):
                    f = tl.load(forb_ptr + offs_n64 * stride_f + k, mask=row_ok, other=-1)
                    hit_k = f[:, None] == offs_v[None, :]
                    r_k = tl.sum(tl.where(hit_k, acc_r, 0.0), axis=1)
                    found = tl.max(hit_k.to(tl.int32), axis=1) > 0
                    tl.store(r_forb_ptr + offs_n64 * K + k, r_k, mask=found & row_ok)

        excess = tl.maximum(acc_r - acc_b, 0.0)
        for a in tl.static_range(A):
            alpha = tl.load(alpha_ptr + a)
            mixed = tl.where(keep, acc_b - alpha * excess, float("-inf"))
            tile_max, tile_arg = tl.max(mixed, axis=1, return_indices=True, return_indices_tie_break_left=True)
            here = cols == a
            old = tl.max(tl.where(here, best, float("-inf")), axis=1)
            better = tile_max > old  # strictly: earlier tiles hold smaller ids
            take = here & better[:, None]
            best = tl.where(take, tile_max[:, None], best)
            arg = tl.where(take, (v0 + tile_arg)[:, None], arg)
            if STATS:
                new = tl.maximum(old, tile_max)
                new_safe = tl.where(new == float("-inf"), 0.0, new)  # old ≤ new: exp(old − new) ≤ 1, 0 at -inf
                s_old = tl.sum(tl.where(here, sum_exp, 0.0), axis=1)
                s_new = s_old * tl.exp(old - new_safe) + tl.sum(tl.exp(mixed - new_safe[:, None]), axis=1)
                sum_exp = tl.where(here, s_new[:, None], sum_exp)

    out = offs_n64[:, None] * (SPLITS * A) + pid_s * A + cols
    out_mask = row_ok[:, None] & (cols < A)
    tl.store(part_max_ptr + out, best, mask=out_mask)
    tl.store(part_arg_ptr + out, arg, mask=out_mask)
    if STATS:
        nonzero = sum_exp > 0.0
        lse = tl.where(nonzero, best + tl.log(tl.where(nonzero, sum_exp, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + out, lse, mask=out_mask)
    tl.store(part_sum_ptr + offs_n64 * SPLITS + pid_s, row_sum, mask=row_ok)


def _gpu_configs():
    shapes = [  # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); two fp32 accumulators per program
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 128, 64, 8, 3),
        (64, 256, 64, 8, 3),
        (64, 64, 128, 4, 3),
        (128, 64, 128, 8, 3),
        (64, 128, 128, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h, "GROUP_N": 8}, num_warps=w, num_stages=s)
        for n, v, h, w, s in shapes
    ]


def _prune(configs, named_args, **kwargs):
    """Token blocks taller than the (bucketed) token count only waste the tensor cores."""
    n = named_args["N_BUCKET"]
    fitting = [c for c in configs if c.kwargs["BLOCK_N"] <= max(64, n)]
    return fitting or configs


_kernel = triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})(_mixing_kernel)
if not INTERPRET:
    _kernel = triton.autotune(
        configs=_gpu_configs(),
        key=["N_BUCKET", "H", "V", "A", "K", "SHARED_W", "SAME_INPUTS", "STATS", "FP32_DOT"],  # + dtypes
        prune_configs_by={"early_config_prune": _prune},
    )(_kernel)


def _splits(n: int, v: int, a_count: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split): enough programs to fill the GPU, partials within budget."""
    if INTERPRET:
        per_split = triton.cdiv(triton.cdiv(v, INTERPRET_SPLITS), INTERPRET_CONFIG["BLOCK_V"]) * INTERPRET_CONFIG["BLOCK_V"]
        return triton.cdiv(v, per_split), per_split
    n_bucket = min(triton.next_power_of_2(max(n, 1)), N_BUCKET_CAP)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    wanted = triton.cdiv(8 * sms, triton.cdiv(n_bucket, 128))  # ~8 waves at BLOCK_N = 128: small tail
    by_width = max(1, v // MIN_SPLIT_COLUMNS)
    by_memory = max(1, PARTIALS_BUDGET_BYTES // (max(n, 1) * 4 * (3 * a_count + 1)))
    splits = max(1, min(wanted, by_width, by_memory))
    per_split = triton.cdiv(triton.cdiv(v, splits), SPLIT_GRANULE) * SPLIT_GRANULE
    return triton.cdiv(v, per_split), per_split


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def generic_labels_triton(hb, wb, hr, wr, alphas, forbidden=None, *, return_stats=False):
    if hb.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "impl='triton' on CPU tensors needs the Triton interpreter, and kernels.triton_mixing was imported "
            "without it: set TRITON_INTERPRET=1 before anything imports the kernel"
        )
    if len(alphas) > MAX_ALPHAS:
        raise ValueError(f"impl='triton' takes at most {MAX_ALPHAS} alphas, got {len(alphas)}")
    n, h = hb.shape
    v = wb.shape[0]
    device = hb.device
    a_count = len(alphas)
    shared_w = same_tensor(wb, wr)
    same_inputs = shared_w and same_tensor(hb, hr)
    hb, hr, wb, wr = map(_inner_contiguous, (hb, hr, wb, wr))
    if shared_w:
        wr = wb
    if same_inputs:
        hr = hb

    if forbidden is not None:
        k = triton.next_power_of_2(forbidden.shape[1])  # padded: fewer compiled variants
        forb = torch.full((n, k), -1, dtype=torch.int32, device=device)
        forb[:, : forbidden.shape[1]] = forbidden
        r_forb = torch.zeros((n, k), dtype=torch.float32, device=device)
    else:
        k = 0
        forb = torch.full((1, 1), -1, dtype=torch.int32, device=device)
        r_forb = torch.zeros((1, 1), dtype=torch.float32, device=device)

    splits, per_split = _splits(n, v, a_count, device)
    part_max = torch.empty((n, splits, a_count), dtype=torch.float32, device=device)
    part_arg = torch.empty((n, splits, a_count), dtype=torch.int32, device=device)
    part_lse = torch.empty((n, splits, a_count), dtype=torch.float32, device=device) if return_stats else part_max
    part_sum = torch.empty((n, splits), dtype=torch.float32, device=device)
    alpha = torch.tensor(list(alphas), dtype=torch.float32, device=device)

    fp32_dot = INTERPRET or hb.dtype != wb.dtype or hb.dtype == torch.float32
    args = (
        hb, hr, wb, wr, alpha, forb,
        part_max, part_arg, part_lse, part_sum, r_forb,
        n, v, h, per_split, splits, min(triton.next_power_of_2(n), N_BUCKET_CAP),
        hb.stride(0), hr.stride(0), wb.stride(0), wr.stride(0), forb.stride(0),
    )
    meta = dict(
        A=a_count, A_PAD=triton.next_power_of_2(a_count), K=k,
        SHARED_W=shared_w, SAME_INPUTS=same_inputs, STATS=return_stats,
        FP32_DOT=fp32_dot, DOT_PRECISION="ieee" if fp32_dot else "tf32",  # 16-bit inputs ignore it
    )
    if INTERPRET:
        grid = (triton.cdiv(n, INTERPRET_CONFIG["BLOCK_N"]) * splits,)
        _kernel[grid](*args, **meta, **INTERPRET_CONFIG)
    else:
        _kernel[lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]) * splits,)](*args, **meta)

    best, arg, lse = _reduce_splits(part_max, part_arg, part_lse if return_stats else None)
    mean = row_mean(part_sum.sum(dim=1), v)
    r_forbidden = r_forb[:, : forbidden.shape[1]] if forbidden is not None else None
    return settle_forbidden(best, arg, lse, mean, r_forbidden, forbidden, alphas, return_stats)


def _reduce_splits(part_max, part_arg, part_lse):
    """Combine per-split partials in split order: the first split holding the max has the smallest id."""
    best, split = part_max.max(dim=1)
    arg = part_arg.gather(1, split.unsqueeze(1)).squeeze(1).long()
    lse = torch.logsumexp(part_lse, dim=1) if part_lse is not None else None
    return best, arg, lse
