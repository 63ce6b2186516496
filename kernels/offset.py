"""The offset (δ-) ensemble's per-token log-probabilities and KL to the big model, without [N, V] logits.

The ensemble's logits are z = z_M + α·(z_P − z_O), with z_X = h_X·W_Xᵀ: M the big frozen model, O the
small frozen one, P its trainable copy. `offset_token_stats` returns log softmax(z)[y] and, on request,
KL(p_M ‖ p_z), both fp32 [N], differentiable w.r.t. P's hidden states and head only (docs/kernel.md).

- `reference`: materialized fp32 [N, V] logits, autograd backward; the ground truth;
- `chunked`: PyTorch over vocabulary column chunks with online reductions; the CPU default;
- `triton`: fused kernels (kernels/triton_offset.py, imported lazily); the CUDA default, the Triton
  interpreter on CPU tensors.
`chunked` and `triton` share `_OffsetStats`: the forward keeps only per-row logsumexps, the backward
recomputes the logits chunk by chunk, so the extra memory is O(N) (+ O(N·chunk) for `chunked`).
"""

from __future__ import annotations

import math

import torch

from kernels.chunked import default_chunk
from kernels.log_probs import RunningLogSumExp
from kernels.mixing import resolve_impl

IGNORE_INDEX = -100
WORK_BUFFERS = 6  # fp32 [N, chunk]: z_M, z_P, z_O, z and the exp temporaries of the reductions


def offset_token_stats(
    h_big: torch.Tensor,
    w_big: torch.Tensor,
    h_small: torch.Tensor,
    w_small: torch.Tensor,
    h_train: torch.Tensor,
    w_train: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    *,
    kl: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log_probs, kl) of the offset ensemble for N positions, each fp32 [N]; kl is None unless asked for.

    h_big [N, H_M], w_big [V, H_M]: M's LM-head inputs and weight; h_small, h_train [N, H_o] and w_small,
    w_train [V, H_o]: O's and P's. targets int [N], -100 = ignored (0 in both outputs, no gradient).
    log_probs[i] = log softmax(z_i)[targets_i]; kl[i] = Σ_v p_M (log p_M − log p_z), the KL to M.
    Gradients flow to h_train and w_train only. impl: "auto" (triton on CUDA, chunked otherwise),
    "reference", "chunked" or "triton"; chunk_size: columns per chunk of `chunked` (default from the budget).
    """
    alpha = _check(h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha, chunk_size)
    name = resolve_impl(impl, h_big.device)
    targets = targets.long()
    if name == "reference":
        return offset_token_stats_reference(h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha, kl=kl)
    if name == "triton":
        from kernels import triton_offset as backend
    else:
        backend = ChunkedOffset(chunk_size)
    log_probs, kl_values = _OffsetStats.apply(
        h_train, w_train, h_big, w_big, h_small, w_small, targets, alpha, kl, backend
    )
    return log_probs, (kl_values if kl else None)


def offset_token_stats_reference(h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha, *, kl=False):
    """The ground truth: fp32 [N, V] logits of all three heads, autograd through h_train and w_train only."""
    z_big = h_big.detach().float() @ w_big.detach().float().T
    z_small = h_small.detach().float() @ w_small.detach().float().T
    z = z_big + alpha * (h_train.float() @ w_train.float().T - z_small)
    log_p = z.log_softmax(-1)
    valid = targets != IGNORE_INDEX
    picked = log_p.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    log_probs = torch.where(valid, picked, torch.zeros_like(picked))
    if not kl:
        return log_probs, None
    log_p_big = z_big.log_softmax(-1)
    divergence = (log_p_big.exp() * (log_p_big - log_p)).sum(-1)
    return log_probs, torch.where(valid, divergence, torch.zeros_like(divergence))


class _OffsetStats(torch.autograd.Function):
    """Forward and backward through a backend (`ChunkedOffset` or kernels.triton_offset) that never stores
    logits: the forward saves per-row logsumexps of z (and z_M), the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, h_train, w_train, h_big, w_big, h_small, w_small, targets, alpha, with_kl, backend):
        heads = (h_big, w_big, h_small, w_small, h_train, w_train)
        log_probs, kl_values, lse_z, lse_big = backend.forward(*heads, targets, alpha, with_kl)
        ctx.save_for_backward(*heads, targets, lse_z, lse_big)
        ctx.alpha, ctx.with_kl, ctx.backend = alpha, with_kl, backend
        return log_probs, kl_values

    @staticmethod
    def backward(ctx, grad_log_probs, grad_kl):
        *heads, targets, lse_z, lse_big = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return (None,) * 10
        valid = targets != IGNORE_INDEX
        zero = torch.zeros(targets.shape, device=targets.device)
        grad_log_probs = zero if grad_log_probs is None else torch.where(valid, grad_log_probs.float(), zero)
        grad_kl = None if grad_kl is None or not ctx.with_kl else torch.where(valid, grad_kl.float(), zero)
        grad_h, grad_w = ctx.backend.backward(
            *heads, targets, ctx.alpha, grad_log_probs, grad_kl, lse_z, lse_big, need_h, need_w
        )
        return (grad_h, grad_w) + (None,) * 8


class ChunkedOffset:
    """The PyTorch backend: the vocabulary in column chunks, fp32 math on fp32 copies of the hidden states.

    The KL takes one pass, not two: KL = lse_z − lse_M + E_{p_M}[z_M − z], and E_{p_M}[·] is a running
    Σ exp(z_M − max)·(z_M − z) rescaled with the running max of z_M (`RunningLogSumExp`). A second pass
    would recompute all three heads' logits, the whole cost of the kernel, for the sake of one division.
    """

    def __init__(self, chunk_size: int | None = None):
        self.chunk_size = chunk_size

    def _chunks(self, h_big, h_small, w_big, w_small):
        n, v = h_big.shape[0], w_big.shape[0]
        cast = w_big.dtype != torch.float32 or w_small.dtype != torch.float32
        width = self.chunk_size or default_chunk(
            n, max(h_big.shape[1], h_small.shape[1]), cast, buffers=WORK_BUFFERS, heads=3
        )
        return [(start, min(start + width, v)) for start in range(0, v, width)]

    @staticmethod
    def _logits(hidden32, weights, start, end, alpha):
        """(z, z_M) of columns [start, end) as fp32 [N, end − start]; P − O is exactly 0 where P = O."""
        (h_big, h_small, h_train), (w_big, w_small, w_train) = hidden32, weights
        z_big = h_big @ w_big[start:end].float().T
        delta = (h_train @ w_train[start:end].float().T).sub_(h_small @ w_small[start:end].float().T)
        return torch.add(z_big, delta, alpha=alpha), z_big

    def forward(self, h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha, with_kl):
        n = h_big.shape[0]
        hidden32 = (h_big.float(), h_small.float(), h_train.float())
        weights = (w_big, w_small, w_train)
        normalizer = RunningLogSumExp(n, h_big.device)
        big_normalizer = RunningLogSumExp(n, h_big.device, weighted=True) if with_kl else None
        target_logits = torch.zeros(n, device=h_big.device)
        for start, end in self._chunks(h_big, h_small, w_big, w_small):
            z, z_big = self._logits(hidden32, weights, start, end, alpha)
            normalizer.add(z)
            column, inside = _target_columns(targets, start, end)
            target_logits = torch.where(inside, z.gather(1, column).squeeze(1), target_logits)
            if with_kl:
                big_normalizer.add(z_big, z_big - z)
        valid = targets != IGNORE_INDEX
        zero = torch.zeros_like(target_logits)
        log_probs = torch.where(valid, normalizer.log_softmax(target_logits), zero)
        if not with_kl:
            return log_probs, zero[:0], normalizer.logsumexp(), zero[:0]
        divergence = (
            (normalizer.max - big_normalizer.max)
            + (normalizer.sum.log() - big_normalizer.sum.log())
            + big_normalizer.softmax_mean()
        )
        return log_probs, torch.where(valid, divergence, zero), normalizer.logsumexp(), big_normalizer.logsumexp()

    def backward(self, h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha,
                 grad_log_probs, grad_kl, lse_z, lse_big, need_h, need_w):
        """dL/dz = g_lp·(onehot(y) − p_z) + g_kl·(p_z − p_M) per chunk; dh_P = α·dz·W_P, dW_P = α·dzᵀ·h_P."""
        hidden32 = (h_big.float(), h_small.float(), h_train.float())
        weights = (w_big, w_small, w_train)
        grad_h = torch.zeros(h_train.shape, device=h_train.device) if need_h else None
        grad_w = torch.empty_like(w_train) if need_w else None
        p_z_weight = -grad_log_probs if grad_kl is None else grad_kl - grad_log_probs
        for start, end in self._chunks(h_big, h_small, w_big, w_small):
            z, z_big = self._logits(hidden32, weights, start, end, alpha)
            grad_z = z.sub_(lse_z[:, None]).exp_().mul_(p_z_weight[:, None])
            if grad_kl is not None:
                grad_z.sub_(z_big.sub_(lse_big[:, None]).exp_().mul_(grad_kl[:, None]))
            column, inside = _target_columns(targets, start, end)
            grad_z.scatter_add_(1, column, torch.where(inside, grad_log_probs, 0.0)[:, None])
            grad_z.mul_(alpha)
            if need_h:
                grad_h.addmm_(grad_z, w_train[start:end].float())
            if need_w:
                grad_w[start:end] = grad_z.T @ hidden32[2]
        return (grad_h.to(h_train.dtype) if need_h else None), grad_w


def _target_columns(targets, start, end):
    """(column within [start, end) as [N, 1] (clamped into range), whether the target falls there [N])."""
    inside = (targets >= start) & (targets < end)
    return (targets - start).clamp(0, end - start - 1)[:, None], inside


def _check(h_big, w_big, h_small, w_small, h_train, w_train, targets, alpha, chunk_size) -> float:
    tensors = {"h_big": h_big, "w_big": w_big, "h_small": h_small, "w_small": w_small,
               "h_train": h_train, "w_train": w_train, "targets": targets}
    not_2d = [name for name, t in tensors.items() if name != "targets" and t.dim() != 2]
    if not_2d:
        raise ValueError(f"hidden states and weights must be 2-D, got {', '.join(f'{k} {tuple(tensors[k].shape)}' for k in not_2d)}")
    n, v = h_big.shape[0], w_big.shape[0]
    if h_small.shape != h_train.shape or h_small.shape[0] != n:
        raise ValueError(f"h_small and h_train must both be [{n}, H_o], got {tuple(h_small.shape)} and {tuple(h_train.shape)}")
    if w_big.shape[1] != h_big.shape[1]:
        raise ValueError(f"w_big must be [V, {h_big.shape[1]}] like h_big's width, got {tuple(w_big.shape)}")
    if w_small.shape != w_train.shape or w_small.shape != (v, h_small.shape[1]):
        raise ValueError(f"w_small and w_train must both be [{v}, {h_small.shape[1]}] (M's vocabulary, the small width), "
                         f"got {tuple(w_small.shape)} and {tuple(w_train.shape)}")
    if v == 0:
        raise ValueError("the vocabulary is empty (w_big is [0, H])")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {', '.join(f'{k}: {d}' for k, d in devices.items())}")
    not_float = [name for name, t in tensors.items() if name != "targets" and not t.is_floating_point()]
    if not_float:
        raise ValueError(f"hidden states and weights must be floating point, got {', '.join(f'{k} {tensors[k].dtype}' for k in not_float)}")
    if targets.shape != (n,) or targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer token ids of shape [{n}], got {targets.dtype} {tuple(targets.shape)}")
    outside = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= v))
    if bool(outside.any()):
        raise ValueError(f"targets must be in [0, {v}) or {IGNORE_INDEX} (ignored), got {int(targets[outside][0])}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}") from None
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return alpha
