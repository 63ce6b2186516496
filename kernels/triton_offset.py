"""Fused Triton kernels for the offset ensemble's log-probabilities, KL to M and their gradients.

Every kernel builds logit tiles z = z_M + α·(z_P − z_O) in registers (`_logit_tiles`: three dot products
over the hidden widths with fp32 accumulators) and never writes them out.
- Forward, grid (token blocks × vocab splits): online logsumexp of z, of z_M and the running
  Σ exp(z_M − max)·(z_M − z) for the KL, plus the target logit; O(N·splits) partials that `forward`
  combines in split order.
- Backward, deterministic, no atomics, in two kernels that each recompute the logit tiles:
  `_grad_hidden_kernel`, grid (token blocks × vocab splits), accumulates dh_P = α·dz·W_P into per-split
  fp32 partials that each program owns alone; `_grad_weight_kernel`, grid (vocab tiles), walks every token
  block in order and accumulates dW_P = α·dzᵀ·h_P into the fp32 rows of W_P that it owns. The price of
  determinism is computing the logits twice in the backward instead of once with atomics.

Import this module only after deciding on the interpreter (kernels.triton_mixing reads TRITON_INTERPRET).
Under the interpreter: one small fixed config, two vocab splits so the split reduction is exercised, tiles
cast to fp32 before tl.dot. On GPU one fixed config per kernel (not autotuned yet: the backward kernels
accumulate into their outputs, so autotuning would need their buffers reset between trials).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_mixing import INTERPRET, _inner_contiguous

INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}
GPU_CONFIG = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}
INTERPRET_SPLITS = 2
MIN_SPLIT_COLUMNS = 1024  # a split is at least this wide on GPU (amortizes the per-program set-up)
GRAD_PARTIALS_BUDGET_BYTES = 256 << 20  # cap on the per-split fp32 dh partials; one split always


@triton.jit
def _dot_tile(h_ptr, w_ptr, stride_h, stride_w, offs_n64, row_ok, offs_v64, col_ok, H,
              FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_N, BLOCK_V] fp32 tile of h·Wᵀ; rows and columns outside the masks come out 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + offs_h
        x = tl.load(h_ptr + offs_n64[:, None] * stride_h + h[None, :], mask=row_ok[:, None] & (h < H)[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_v64[None, :] * stride_w + h[:, None], mask=(h < H)[:, None] & col_ok[None, :], other=0.0)
        if FP32_DOT:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logit_tiles(hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr,
                 stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
                 offs_n64, row_ok, offs_v64, col_ok, H_M, H_O, alpha,
                 FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(z, z_M) tiles; P and O in separate accumulators, so z = z_M exactly where P = O."""
    z_big = _dot_tile(hm_ptr, wm_ptr, stride_hm, stride_wm, offs_n64, row_ok, offs_v64, col_ok, H_M,
                      FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    z_train = _dot_tile(hp_ptr, wp_ptr, stride_hp, stride_wp, offs_n64, row_ok, offs_v64, col_ok, H_O,
                        FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    z_small = _dot_tile(ho_ptr, wo_ptr, stride_ho, stride_wo, offs_n64, row_ok, offs_v64, col_ok, H_O,
                        FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    return z_big + alpha * (z_train - z_small), z_big


@triton.jit
def _forward_kernel(
    hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr, y_ptr,
    part_lse_ptr, part_target_ptr, part_lse_big_ptr, part_mean_ptr,
    alpha, N, V, H_M, H_O, V_PER_SPLIT, SPLITS,
    stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
    KL: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)  # fastest: consecutive programs share a split's weight tiles in L2
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    y = tl.load(y_ptr + offs_n64, mask=row_ok, other=-1)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    big_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    big_sum = tl.zeros([BLOCK_N], tl.float32)
    big_weighted = tl.zeros([BLOCK_N], tl.float32)  # Σ exp(z_M − big_max)·(z_M − z)

    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_end
        z, z_big = _logit_tiles(hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr,
                                stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
                                offs_n64, row_ok, offs_v.to(tl.int64), col_ok, H_M, H_O, alpha,
                                FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        target += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        masked = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(masked, axis=1))  # finite: every tile has a valid column
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), axis=1)
        run_max = new_max
        if KL:
            gap = tl.where(col_ok[None, :], z_big - z, 0.0)
            masked_big = tl.where(col_ok[None, :], z_big, float("-inf"))
            new_big_max = tl.maximum(big_max, tl.max(masked_big, axis=1))
            rescale = tl.exp(big_max - new_big_max)
            exp_big = tl.exp(masked_big - new_big_max[:, None])
            big_sum = big_sum * rescale + tl.sum(exp_big, axis=1)
            big_weighted = big_weighted * rescale + tl.sum(exp_big * gap, axis=1)
            big_max = new_big_max

    out = offs_n64 * SPLITS + pid_s
    tl.store(part_lse_ptr + out, run_max + tl.log(run_sum), mask=row_ok)
    tl.store(part_target_ptr + out, target, mask=row_ok)
    if KL:
        tl.store(part_lse_big_ptr + out, big_max + tl.log(big_sum), mask=row_ok)
        tl.store(part_mean_ptr + out, big_weighted / big_sum, mask=row_ok)


@triton.jit
def _logit_grad_tile(z, z_big, y, offs_v, row_ok, col_ok, lse, lse_big, g_lp, g_kl, alpha, KL: tl.constexpr):
    """α·dL/dz = α·(g_lp·(onehot(y) − p_z) + g_kl·(p_z − p_M)), 0 outside the masks."""
    grad = (g_kl - g_lp)[:, None] * tl.exp(z - lse[:, None])
    if KL:
        grad -= g_kl[:, None] * tl.exp(z_big - lse_big[:, None])
    grad += tl.where(offs_v[None, :] == y[:, None], g_lp[:, None], 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], alpha * grad, 0.0)


@triton.jit
def _row_state(offs_n64, row_ok, y_ptr, lse_ptr, lse_big_ptr, g_lp_ptr, g_kl_ptr, KL: tl.constexpr):
    """Per-row inputs of the backward: target, logsumexps and upstream gradients (0 for rows past N)."""
    y = tl.load(y_ptr + offs_n64, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_n64, mask=row_ok, other=0.0)
    g_lp = tl.load(g_lp_ptr + offs_n64, mask=row_ok, other=0.0)
    if KL:
        lse_big = tl.load(lse_big_ptr + offs_n64, mask=row_ok, other=0.0)
        g_kl = tl.load(g_kl_ptr + offs_n64, mask=row_ok, other=0.0)
    else:
        lse_big = lse
        g_kl = tl.zeros_like(g_lp)
    return y, lse, lse_big, g_lp, g_kl


@triton.jit
def _grad_hidden_kernel(
    hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr, y_ptr, lse_ptr, lse_big_ptr, g_lp_ptr, g_kl_ptr, dh_ptr,
    alpha, N, V, H_M, H_O, V_PER_SPLIT,
    stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
    KL: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    y, lse, lse_big, g_lp, g_kl = _row_state(offs_n64, row_ok, y_ptr, lse_ptr, lse_big_ptr, g_lp_ptr, g_kl_ptr, KL)
    dh_rows = dh_ptr + pid_s.to(tl.int64) * N * H_O + offs_n64[:, None] * H_O  # this split's partial, [N, H_O]
    offs_h = tl.arange(0, BLOCK_H)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_end
        offs_v64 = offs_v.to(tl.int64)
        z, z_big = _logit_tiles(hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr,
                                stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
                                offs_n64, row_ok, offs_v64, col_ok, H_M, H_O, alpha,
                                FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        grad = _logit_grad_tile(z, z_big, y, offs_v, row_ok, col_ok, lse, lse_big, g_lp, g_kl, alpha, KL)
        for h0 in range(0, H_O, BLOCK_H):
            h = h0 + offs_h
            w = tl.load(wp_ptr + offs_v64[:, None] * stride_wp + h[None, :], mask=col_ok[:, None] & (h < H_O)[None, :], other=0.0)
            tile_mask = row_ok[:, None] & (h < H_O)[None, :]
            acc = tl.load(dh_rows + h[None, :], mask=tile_mask, other=0.0)
            if FP32_DOT:
                acc = tl.dot(grad, w.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(grad.to(w.dtype), w, acc)
            tl.store(dh_rows + h[None, :], acc, mask=tile_mask)


@triton.jit
def _grad_weight_kernel(
    hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr, y_ptr, lse_ptr, lse_big_ptr, g_lp_ptr, g_kl_ptr, dw_ptr,
    alpha, N, V, H_M, H_O,
    stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
    KL: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    offs_v64 = offs_v.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    for n0 in range(0, N, BLOCK_N):  # in order: the sum over token blocks is the same on every run
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        offs_n64 = offs_n.to(tl.int64)
        y, lse, lse_big, g_lp, g_kl = _row_state(offs_n64, row_ok, y_ptr, lse_ptr, lse_big_ptr, g_lp_ptr, g_kl_ptr, KL)
        z, z_big = _logit_tiles(hm_ptr, wm_ptr, ho_ptr, wo_ptr, hp_ptr, wp_ptr,
                                stride_hm, stride_wm, stride_ho, stride_wo, stride_hp, stride_wp,
                                offs_n64, row_ok, offs_v64, col_ok, H_M, H_O, alpha,
                                FP32_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        grad_t = tl.trans(_logit_grad_tile(z, z_big, y, offs_v, row_ok, col_ok, lse, lse_big, g_lp, g_kl, alpha, KL))
        for h0 in range(0, H_O, BLOCK_H):
            h = h0 + offs_h
            x = tl.load(hp_ptr + offs_n64[:, None] * stride_hp + h[None, :], mask=row_ok[:, None] & (h < H_O)[None, :], other=0.0)
            tile = dw_ptr + offs_v64[:, None] * H_O + h[None, :]
            tile_mask = col_ok[:, None] & (h < H_O)[None, :]
            acc = tl.load(tile, mask=tile_mask, other=0.0)
            if FP32_DOT:
                acc = tl.dot(grad_t, x.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(grad_t.to(x.dtype), x, acc)
            tl.store(tile, acc, mask=tile_mask)


def _config() -> dict:
    return INTERPRET_CONFIG if INTERPRET else GPU_CONFIG


def _splits(n: int, v: int, device: torch.device, cap: int | None = None) -> tuple[int, int]:
    """(splits, columns per split): enough (token block × split) programs for ~2 waves on the GPU, at most `cap`."""
    if INTERPRET:
        wanted = INTERPRET_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(1, min(triton.cdiv(2 * sms, triton.cdiv(n, _config()["BLOCK_N"])), v // MIN_SPLIT_COLUMNS))
    if cap is not None:
        wanted = max(1, min(wanted, cap))
    block_v = _config()["BLOCK_V"]
    per_split = triton.cdiv(triton.cdiv(v, wanted), block_v) * block_v
    return triton.cdiv(v, per_split), per_split


def _launch_args(h_big, w_big, h_small, w_small, h_train, w_train):
    """Contiguous-row inputs, their strides and the dot flavour (fp32 under the interpreter, for fp32 or mixed dtypes)."""
    heads = tuple(map(_inner_contiguous, (h_big, w_big, h_small, w_small, h_train, w_train)))
    fp32_dot = INTERPRET or len({t.dtype for t in heads}) > 1 or heads[0].dtype == torch.float32
    meta = {"FP32_DOT": fp32_dot, "DOT_PRECISION": "ieee" if fp32_dot else "tf32", **_config()}
    strides = tuple(t.stride(0) for t in heads)
    return heads, strides, meta


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "impl='triton' on CPU tensors needs the Triton interpreter, and kernels.triton_mixing was imported "
            "without it: set TRITON_INTERPRET=1 before anything imports the kernel"
        )


def forward(h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha, with_kl):
    """(log_probs, kl or empty, lse of z, lse of z_M or empty), each fp32 [N]."""
    _check_device(h_big)
    n, v = h_big.shape[0], w_big.shape[0]
    device = h_big.device
    empty = torch.zeros(0, device=device)
    if n == 0:
        return empty, empty, empty, empty
    heads, strides, meta = _launch_args(h_big, w_big, h_small, w_small, h_train, w_train)
    splits, per_split = _splits(n, v, device)
    part_lse, part_target = (torch.empty((n, splits), device=device) for _ in range(2))
    part_lse_big, part_mean = (torch.empty((n, splits) if with_kl else (1, 1), device=device) for _ in range(2))
    grid = (triton.cdiv(n, meta["BLOCK_N"]), splits)
    _forward_kernel[grid](*heads, targets.contiguous(), part_lse, part_target, part_lse_big, part_mean,
                          alpha, n, v, heads[0].shape[1], heads[2].shape[1], per_split, splits, *strides,
                          KL=with_kl, **meta)
    valid = targets != -100
    zero = torch.zeros(n, device=device)
    lse = torch.logsumexp(part_lse, dim=1)
    log_probs = torch.where(valid, part_target.sum(dim=1) - lse, zero)  # one split holds the target, the rest add 0
    if not with_kl:
        return log_probs, empty, lse, empty
    lse_big = torch.logsumexp(part_lse_big, dim=1)
    mean_gap = ((part_lse_big - lse_big[:, None]).exp() * part_mean).sum(dim=1)  # E_{p_M}[z_M − z] over splits
    return log_probs, torch.where(valid, lse - lse_big + mean_gap, zero), lse, lse_big


def backward(h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha,
             grad_log_probs, grad_kl, lse, lse_big, need_h, need_w):
    """(dL/dh_train, dL/dw_train) in their input dtypes (None where not needed); fp32 accumulation."""
    n, v = h_big.shape[0], w_big.shape[0]
    device = h_big.device
    if n == 0:
        return (torch.zeros_like(h_train) if need_h else None), (torch.zeros_like(w_train) if need_w else None)
    heads, strides, meta = _launch_args(h_big, w_big, h_small, w_small, h_train, w_train)
    h_o = heads[4].shape[1]
    with_kl = grad_kl is not None
    rows = (targets.contiguous(), lse, lse_big if with_kl else lse, grad_log_probs, grad_kl if with_kl else grad_log_probs)
    sizes = (alpha, n, v, heads[0].shape[1], h_o)
    grad_h = None
    if need_h:
        splits, per_split = _splits(n, v, device, cap=GRAD_PARTIALS_BUDGET_BYTES // (4 * n * h_o))
        partials = torch.zeros((splits, n, h_o), device=device)
        grid = (triton.cdiv(n, meta["BLOCK_N"]), splits)
        _grad_hidden_kernel[grid](*heads, *rows, partials, *sizes, per_split, *strides, KL=with_kl, **meta)
        grad_h = partials.sum(dim=0) if splits > 1 else partials[0]  # split order: deterministic
    grad_w = None
    if need_w:
        grad_w = torch.zeros(w_train.shape, device=device)
        grid = (triton.cdiv(v, meta["BLOCK_V"]),)
        _grad_weight_kernel[grid](*heads, *rows, grad_w, *sizes, *strides, KL=with_kl, **meta)
    return (grad_h.to(h_train.dtype) if need_h else None), (grad_w.to(w_train.dtype) if need_w else None)
