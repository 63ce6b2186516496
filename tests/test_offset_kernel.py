"""`kernels.offset_token_stats`: every implementation against the fp32 reference, values and gradients, on odd
shapes in three dtypes; ignored targets; the ensemble equals M at initialization; frozen inputs stay
without gradients; bad input; and the chunked path's extra memory against the materialized logits.

Without CUDA the Triton kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1): about a
second per forward + backward at these shapes, so the Triton cases stay few.
"""

from __future__ import annotations

import pytest
import torch

import kernels.profile as prof
from kernels import offset_token_stats, token_log_probs
from test_kernels import DEVICE, DTYPES, TOL

N, H_BIG, H_SMALL, V = 37, 29, 19, 131  # no block size divides any of them
ALPHA = 1.5
IGNORED_ROWS = [3, 20, 36]
IMPLS = {"chunked": dict(impl="chunked"), "chunked-small": dict(impl="chunked", chunk_size=16), "triton": dict(impl="triton")}


def grad_tol(dtype):
    """Gradients come back in the input dtype: both sides round fp32 sums into it, one ulp apart at most."""
    return dict(rtol=max(TOL[dtype]["rtol"], torch.finfo(dtype).eps), atol=TOL[dtype]["atol"])


def make_inputs(dtype, seed=0, n=N, h_big=H_BIG, h_small=H_SMALL, v=V, at_init=False):
    """(frozen heads, trainable h_train, w_train, targets): logits ~ N(0, 9), P a perturbed copy of O."""
    g = torch.Generator().manual_seed(seed)
    h_b, h_s = torch.randn(n, h_big, generator=g), torch.randn(n, h_small, generator=g)
    w_b = 3 * torch.randn(v, h_big, generator=g) / h_big**0.5
    w_s = 3 * torch.randn(v, h_small, generator=g) / h_small**0.5
    h_t, w_t = h_s.clone(), w_s.clone()
    if not at_init:
        h_t += 0.3 * torch.randn(n, h_small, generator=g)
        w_t += 0.9 * torch.randn(v, h_small, generator=g) / h_small**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[i for i in IGNORED_ROWS if i < n]] = -100
    frozen = [t.to(DEVICE, dtype) for t in (h_b, w_b, h_s, w_s)]
    trainable = [t.to(DEVICE, dtype).requires_grad_() for t in (h_t, w_t)]
    return frozen, trainable, targets.to(DEVICE)


def run(inputs, with_kl, upstream=None, **impl):
    """Values and, for a loss Σ g_lp·log_probs + Σ g_kl·kl with random weights, the gradients of h_train, w_train."""
    frozen, (h_t, w_t), targets = inputs
    h_t.grad = w_t.grad = None
    log_probs, kl = offset_token_stats(*frozen, h_t, w_t, targets, ALPHA, kl=with_kl, **impl)
    g = torch.Generator().manual_seed(1)
    g_lp, g_kl = (torch.randn(targets.shape[0], generator=g).to(DEVICE) for _ in range(2))
    loss = (g_lp * log_probs).sum() + ((g_kl * kl).sum() if with_kl else 0)
    loss.backward()
    return log_probs.detach(), (kl.detach() if with_kl else None), h_t.grad, w_t.grad


@pytest.mark.parametrize("with_kl", [True, False], ids=["kl", "no-kl"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_gradients_match_the_reference(impl, dtype, with_kl):
    inputs = make_inputs(dtype)
    want = run(inputs, with_kl, impl="reference")
    got = run(inputs, with_kl, **IMPLS[impl])
    for name, value, expected in zip(("log_probs", "kl"), got[:2], want[:2]):
        if expected is None:
            assert value is None
            continue
        assert value.dtype == torch.float32 and value.shape == (N,), name
        torch.testing.assert_close(value, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    for name, value, expected in zip(("h_train", "w_train"), got[2:], want[2:]):
        assert value.dtype == dtype and value.shape == expected.shape, name
        torch.testing.assert_close(value.float(), expected.float(), **grad_tol(dtype), msg=lambda m: f"d{name}: {m}")
    assert want[2].abs().max() > 0.1 and want[3].abs().max() > 0.1  # the gradient checks are not vacuous


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_ignored_targets_give_zero_and_no_gradient(impl):
    inputs = make_inputs(torch.float32)
    log_probs, kl, grad_h, grad_w = run(inputs, True, **IMPLS.get(impl, dict(impl=impl)))
    ignored = torch.tensor(IGNORED_ROWS)
    assert (log_probs[ignored] == 0).all() and (kl[ignored] == 0).all()
    assert (grad_h[ignored] == 0).all()
    kept = [i for i in range(N) if i not in IGNORED_ROWS]
    frozen, (h_t, w_t), targets = inputs
    only_kept = ([t[kept] if t.shape[0] == N else t for t in frozen],
                 [h_t.detach()[kept].requires_grad_(), w_t.detach().clone().requires_grad_()], targets[kept])
    g = torch.Generator().manual_seed(1)
    g_lp, g_kl = (torch.randn(N, generator=g).to(DEVICE)[kept] for _ in range(2))
    lp_kept, kl_kept = offset_token_stats(*only_kept[0], *only_kept[1], only_kept[2], ALPHA, kl=True, **IMPLS.get(impl, dict(impl=impl)))
    ((g_lp * lp_kept).sum() + (g_kl * kl_kept).sum()).backward()
    torch.testing.assert_close(grad_w, only_kept[1][1].grad, **TOL[torch.float32])  # the ignored rows added nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_the_ensemble_equals_the_big_model_at_initialization(impl, dtype):
    """P = O: the offset is exactly 0, so log p is M's own and the KL to M is exactly 0."""
    frozen, trainable, targets = make_inputs(dtype, at_init=True)
    log_probs, kl = offset_token_stats(*frozen, *trainable, targets, ALPHA, kl=True, **IMPLS.get(impl, dict(impl=impl)))
    valid = targets != -100
    big = token_log_probs(frozen[0][valid], frozen[1], targets[valid])
    torch.testing.assert_close(log_probs[valid], big, **TOL[dtype])
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_frozen_inputs_never_get_gradients(impl):
    frozen, (h_t, w_t), targets = make_inputs(torch.float32, n=9)
    for t in frozen:
        t.requires_grad_()  # even when the caller left them trainable
    log_probs, kl = offset_token_stats(*frozen, h_t, w_t, targets, ALPHA, kl=True, **IMPLS.get(impl, dict(impl=impl)))
    (log_probs.sum() + kl.sum()).backward()
    assert all(t.grad is None for t in frozen)
    assert h_t.grad is not None and w_t.grad is not None

    h_t.grad = w_t.grad = None
    log_probs, _ = offset_token_stats(*(t.detach() for t in frozen), h_t.detach(), w_t, targets, ALPHA, **IMPLS.get(impl, dict(impl=impl)))
    log_probs.sum().backward()  # only the head trains: no gradient for the hidden states is asked or given
    assert w_t.grad is not None and h_t.grad is None


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
def test_empty_batch(impl):
    frozen, (h_t, w_t), targets = make_inputs(torch.float32)
    empty = [t[:0] if t.shape[0] == N else t for t in frozen]
    log_probs, kl = offset_token_stats(*empty, h_t[:0], w_t, targets[:0], ALPHA, kl=True, impl=impl)
    assert log_probs.shape == kl.shape == (0,)
    (log_probs.sum() + kl.sum()).backward()
    assert (w_t.grad == 0).all()


def test_triton_is_deterministic():
    inputs = make_inputs(torch.float32)
    first, second = (run(inputs, True, impl="triton") for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _bad_inputs():
    x, w, s, ws = torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 2), torch.zeros(3, 2)
    y = torch.zeros(2, dtype=torch.long)
    return {
        "hidden 1-D": ((x[0], w, s, ws, s, ws, y, 1.0), "must be 2-D"),
        "small/train rows": ((x, w, s, ws, torch.zeros(3, 2), ws, y, 1.0), "h_small and h_train"),
        "small width": ((x, w, s, ws, torch.zeros(2, 3), ws, y, 1.0), "h_small and h_train"),
        "big width": ((x, torch.zeros(3, 5), s, ws, s, ws, y, 1.0), "w_big must be"),
        "vocabularies": ((x, w, s, torch.zeros(4, 2), s, torch.zeros(4, 2), y, 1.0), "M's vocabulary"),
        "train head": ((x, w, s, ws, s, torch.zeros(3, 3), y, 1.0), "w_small and w_train"),
        "empty vocabulary": ((x, w[:0], s, ws[:0], s, ws[:0], y, 1.0), "vocabulary is empty"),
        "devices": ((x, w, s, ws, s, ws, y.to("meta"), 1.0), "one device"),
        "integer hidden": ((x.long(), w, s, ws, s, ws, y, 1.0), "floating point"),
        "float targets": ((x, w, s, ws, s, ws, y.float(), 1.0), "integer token ids"),
        "targets shape": ((x, w, s, ws, s, ws, y[:1], 1.0), "integer token ids"),
        "target >= V": ((x, w, s, ws, s, ws, y + 3, 1.0), r"targets must be in \[0, 3\) or -100"),
        "target -1": ((x, w, s, ws, s, ws, y - 1, 1.0), "targets must be in"),
        "alpha 0": ((x, w, s, ws, s, ws, y, 0.0), "alpha must be a positive finite"),
        "alpha nan": ((x, w, s, ws, s, ws, y, float("nan")), "alpha must be a positive finite"),
        "alpha text": ((x, w, s, ws, s, ws, y, "one"), "alpha must be a positive finite"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_invalid_inputs_are_refused_in_one_line(name):
    args, message = _bad_inputs()[name]
    with pytest.raises(ValueError, match=message) as error:
        offset_token_stats(*args)
    assert "\n" not in str(error.value)


def test_unknown_impl_bad_chunk_and_triton_without_interpreter(monkeypatch):
    (frozen, trainable, targets) = make_inputs(torch.float32, n=2, v=5)
    with pytest.raises(ValueError, match="unknown impl"):
        offset_token_stats(*frozen, *trainable, targets, ALPHA, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        offset_token_stats(*frozen, *trainable, targets, ALPHA, chunk_size=0)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            offset_token_stats(*frozen, *trainable, targets, ALPHA, impl="triton")


@pytest.mark.skipif(DEVICE != "cpu" or prof.MemoryMeter(torch.device("cpu")).method != "RSS high-water delta",
                    reason="measures the CPU resident-set high-water mark (Linux)")
def test_chunked_extra_memory_is_far_below_the_logits():
    """Forward + backward at N = 1024, V = 32000, measured like `profile-kernel` measures it: the chunked
    path's peak extra memory against one [N, V] fp32 logits matrix. The reference, on a quarter of the rows
    (to stay light), shows that the meter sees materialized logits."""
    n, v = 1024, 32000
    inputs = make_inputs(torch.float32, n=n, h_big=64, h_small=16, v=v)
    frozen, (h_t, w_t), targets = inputs
    quarter = ([t[: n // 4] if t.shape[0] == n else t for t in frozen],
               [h_t.detach()[: n // 4].requires_grad_(), w_t], targets[: n // 4])
    extra = {}
    for impl, case in (("chunked", inputs), ("reference", quarter)):
        run(case, True, impl=impl)  # warm-up: first-call allocations stay out of the figure
        with prof.MemoryMeter(torch.device("cpu")) as meter:
            run(case, True, impl=impl)
        extra[impl] = meter.extra
    logits_bytes = n * v * 4
    assert extra["reference"] >= 2 * logits_bytes / 4, extra
    assert extra["chunked"] < logits_bytes / 5, extra  # measured 7–12 MiB against 125 MiB, the dW output included
