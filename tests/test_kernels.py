"""`kernels.generic_labels`: every implementation against the fp32 reference, across dtypes and odd shapes.

Without CUDA the Triton kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
these shapes stay small. Labels are checked by value (the fp32 mixed logit at the chosen id is within
tolerance of the row max) and by id wherever the reference's top two values are clearly apart; cases built
from small integers are exact in every dtype, so there (exact ties included) ids must match exactly.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

import kernels.chunked
from kernels import generic_labels
from kernels.reference import baseline_and_excess

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# All paths accumulate in fp32 from the same low-precision inputs, so differences are fp32 rounding of
# sums in another order; 16-bit inputs get a looser bound for tensor-core accumulation order on GPU.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-4, atol=1e-3),
    torch.float16: dict(rtol=1e-4, atol=1e-3),
}
ALPHAS = {1: [2.5], 5: [0.5, 1.0, 2.5, 5.0, 10.0]}
IMPLS = ["chunked", "chunked-small", "triton"]  # chunked-small: 16-column chunks, many chunk boundaries
N, H, V = 47, 31, 123  # no block size divides any of them
TIE_PAIRS = [(0, 122), (5, 100), (31, 32), (40, 41), (63, 64)]  # across chunks, tiles, splits; same tile
MEAN_TIES = [(50, 20), (10, 70)]  # (forbidden id, id whose logit equals the row mean): larger, smaller
VIA_MEAN = (7, 90)  # two huge baseline logits, forbidden together: both become the mean and tie
KINDS = ["random", "wide", "single_row", "shared_w", "same_inputs", "ties", "flip", "forbidden_blocked", "via_mean"]


@dataclass
class Case:
    hb: torch.Tensor
    wb: torch.Tensor
    hr: torch.Tensor
    wr: torch.Tensor
    forbidden: torch.Tensor | None
    exact: bool = False  # small integers: every path computes the same fp32 values, ids must match
    rows: dict = field(default_factory=dict)  # what the construction promises, per row (see test below)

    def run(self, impl, alphas, return_stats=False):
        args = (self.hb, self.wb, self.hr, self.wr, alphas, self.forbidden)
        if impl == "chunked-small":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(kernels.chunked, "MIN_CHUNK", 16)
                mp.setattr(kernels.chunked, "MAX_CHUNK", 16)
                return generic_labels(*args, impl="chunked", return_stats=return_stats)
        return generic_labels(*args, impl=impl, return_stats=return_stats)


def _randint(g, low, high, *shape):
    return torch.randint(low, high, shape, generator=g).float()


def _random_forbidden(g, n, v, k):
    """Random ids with a duplicate in every row, ~30% -1 padding and one row of padding only."""
    ids = torch.randint(0, v, (n, k), generator=g)
    ids[:, 1] = ids[:, 0]
    ids[torch.rand((n, k), generator=g) < 0.3] = -1
    ids[n // 2] = -1
    return ids


def _cast(dtype, *tensors):
    return [t.to(dtype) for t in tensors]


def make_case(kind: str, dtype: torch.dtype, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    n, h, v = {"wide": (20, 64, 300), "single_row": (1, H, V)}.get(kind, (N, H, V))
    forbidden, exact, rows = None, False, {}

    if kind in ("random", "wide", "single_row", "shared_w", "same_inputs", "forbidden_blocked"):
        hb = torch.randn(n, h, generator=g)
        wb = torch.randn(v, h, generator=g) * 3 / math.sqrt(h)
        hr = hb + 0.5 * torch.randn(n, h, generator=g)
        wr = wb + 0.3 * torch.randn(v, h, generator=g) * 3 / math.sqrt(h)
        if kind == "wide":  # every logit far below -88: exp underflows, the logsumexp must not
            hb[:, 0], wb[:, 0], wr[:, 0] = 1, -300, -300
        hb, wb, hr, wr = _cast(dtype, hb, wb, hr, wr)
        if kind == "shared_w":
            wr = wb
        if kind == "same_inputs":
            hr, wr = hb, wb
        if kind != "random":
            forbidden = _random_forbidden(g, n, v, 3 if kind == "single_row" else 6)
        if kind == "same_inputs":  # forbid the baseline's own winner in every other row
            forbidden[::2, 2] = (hb.float() @ wb.float().T).argmax(dim=1)[::2]
        if kind == "forbidden_blocked":  # forbid each α's unforbidden winner (with duplicates and padding)
            winners = generic_labels(hb, wb, hr, wr, ALPHAS[5], impl="reference")
            pad = torch.full((n, 1), -1)
            forbidden = torch.cat([winners[:, :1], pad, winners[:, 1:3], winners[:, :1], winners[:, 3:], pad], dim=1)
            rows["blocked"] = winners

    elif kind == "ties":  # duplicated W rows, rows whose best id is one of the pair: exact ties
        exact = True
        wb = _randint(g, -3, 4, v, h)
        wr = wb + _randint(g, -1, 2, v, h)
        # Two control columns make b a chosen vector in the mean-tie rows: one forbidden id at 244, one
        # other id at 2, the rest 0 → mean 246/123 = 2: the forbidden id ties with the other through the mean.
        for column, (forbidden_id, other_id) in zip((h - 1, h - 2), MEAN_TIES):
            wb[:, column] = wr[:, column] = 0
            wb[forbidden_id, column], wb[other_id, column] = 244, 2
        for i, j in TIE_PAIRS:
            wb[j] = wb[i]
            wr[i] = wr[j] = wb[i]
        hb = _randint(g, -3, 4, n, h)
        hr = hb + _randint(g, -1, 2, n, h)
        forbidden = torch.full((n, 2), -1)
        for row in range(2 * len(TIE_PAIRS)):
            i, j = TIE_PAIRS[row % len(TIE_PAIRS)]
            hb[row] = hr[row] = wb[i]  # b_i = r_i = |W_i|² ≫ any other logit
            rows[row] = (i, j)
        for row, k in zip(range(2 * len(TIE_PAIRS), n), range(4)):
            forbidden_id, other_id = MEAN_TIES[k % 2]
            hb[row] = hr[row] = 0
            hb[row, h - 1 - k % 2] = hr[row, h - 1 - k % 2] = 1  # b = that control column, r = 0
            forbidden[row] = torch.tensor([forbidden_id, forbidden_id if k >= 2 else -1])
            rows.setdefault("mean_tie", {})[row] = min(forbidden_id, other_id)
        hb, wb, hr, wr = _cast(dtype, hb, wb, hr, wr)

    elif kind == "flip":  # the reinforced model triples the baseline's winners: mixing moves every label
        hb, wb = _cast(dtype, torch.randn(n, h, generator=g), torch.randn(v, h, generator=g))
        winners = (hb.float() @ wb.float().T).argmax(dim=1)
        wr = wb.clone()
        wr[winners.unique()] = (3 * wb[winners.unique()].float()).to(dtype)
        hr = hb.clone()
        rows["baseline_winner"] = winners

    elif kind == "via_mean":  # others very negative, two huge forbidden ids: the mean wins (ties → smaller)
        exact = True
        f1, f2 = VIA_MEAN
        hb, hr, wb = _randint(g, -1, 2, n, h), _randint(g, -1, 2, n, h), _randint(g, -1, 2, v, h)
        hb[:, 0], hr[:, 0], wb[:, 0] = 1, 0, -20
        wb[[f1, f2], 0] = 4096
        wr = wb.clone()
        patterns = [[f1, f2, f1, -1], [f2, -1, f1, f2], [f2, -1, -1, -1]]  # last: f1 wins by its own logit
        forbidden = torch.tensor([patterns[row % 3] for row in range(n)])
        rows["via_mean"] = [row for row in range(n) if row % 3 < 2]
        hb, wb, hr, wr = _cast(dtype, hb, wb, hr, wr)

    else:
        raise ValueError(kind)

    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    hb_d, wb_d = to(hb), to(wb)
    hr_d = hb_d if hr is hb else to(hr)
    wr_d = wb_d if wr is wb else to(wr)
    return Case(hb_d, wb_d, hr_d, wr_d, to(forbidden), exact, rows)


def mixed_logits(case: Case, alphas) -> torch.Tensor:
    """fp32 [A, N, V] mixed logits from the same (possibly low-precision) inputs."""
    b, excess = baseline_and_excess(case.hb, case.wb, case.hr, case.wr, case.forbidden)
    return torch.stack([b - alpha * excess for alpha in alphas])


def assert_labels_match(case: Case, alphas, labels, expected, tol):
    assert labels.dtype == torch.long and labels.shape == expected.shape
    if case.exact:
        assert torch.equal(labels, expected)
        return
    mixed = mixed_logits(case, alphas)  # [A, N, V]
    top2 = mixed.topk(2, dim=2).values if mixed.shape[2] > 1 else mixed.repeat(1, 1, 2)
    slack = tol["atol"] + tol["rtol"] * top2[..., 0].abs()
    chosen = mixed.gather(2, labels.T.unsqueeze(2)).squeeze(2)
    assert (chosen >= top2[..., 0] - slack).all(), "a label's mixed value is not the row max"
    clear = (top2[..., 0] - top2[..., 1]) > 2 * slack  # no near-tie: the id itself must match
    assert clear.float().mean() > 0.6  # the id check is not vacuous
    assert torch.equal(labels.T[clear], expected.T[clear])


@pytest.mark.parametrize("n_alphas", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, kind, dtype, n_alphas):
    case, alphas, tol = make_case(kind, dtype), ALPHAS[n_alphas], TOL[dtype]
    ref_labels, ref_lse, ref_max = case.run("reference", alphas, return_stats=True)
    labels, lse, best = case.run(impl, alphas, return_stats=True)
    assert_labels_match(case, alphas, labels, ref_labels, tol)
    for got, want in ((lse, ref_lse), (best, ref_max)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    assert torch.equal(case.run(impl, alphas), labels)  # the labels-only variant picks the same ids


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cases_do_what_they_claim(dtype):
    """The constructions really tie, flip and forbid (checked on the reference, in every dtype)."""
    alphas = ALPHAS[5]
    ties = make_case("ties", dtype)
    labels = ties.run("reference", alphas)
    mixed = mixed_logits(ties, alphas)
    for row, (i, j) in ((row, pair) for row, pair in ties.rows.items() if row != "mean_tie"):
        assert torch.equal(mixed[:, row, i], mixed[:, row, j])
        assert (labels[row] == i).all()  # the pair's smaller id, though j has the same value
    for row, winner in ties.rows["mean_tie"].items():
        forbidden_id = int(ties.forbidden[row, 0])
        top2 = mixed[:, row].topk(2).values
        assert torch.equal(top2[:, 0], top2[:, 1]) and (top2[:, 0] == 2).all()  # the mean ties the other id
        assert (labels[row] == winner).all() and (mixed[:, row, forbidden_id] == 2).all()

    flip = make_case("flip", dtype)
    assert (flip.run("reference", alphas) != flip.rows["baseline_winner"][:, None].to(DEVICE)).all()

    blocked = make_case("forbidden_blocked", dtype)
    assert (blocked.run("reference", alphas) != blocked.rows["blocked"].to(DEVICE)).all()

    via_mean = make_case("via_mean", dtype)
    labels, _, best = via_mean.run("reference", alphas, return_stats=True)
    rows = via_mean.rows["via_mean"]
    mean = (via_mean.hb.float() @ via_mean.wb.float().T).mean(dim=1)
    assert (labels[rows] == VIA_MEAN[0]).all()  # both forbidden ids sit at the mean: the smaller wins
    torch.testing.assert_close(best[rows], mean[rows, None].expand(-1, len(alphas)))
    assert (mean[rows] > 0).all() and (labels[2::3] == VIA_MEAN[0]).all()


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("with_forbidden", [False, True])
def test_empty_batch(impl, with_forbidden):
    case = make_case("random", torch.float32)
    empty = case.hb[:0]
    forbidden = torch.full((0, 3), -1, device=DEVICE) if with_forbidden else None
    labels = generic_labels(empty, case.wb, empty, case.wr, ALPHAS[5], forbidden, impl=impl)
    labels_s, lse, best = generic_labels(
        empty, case.wb, empty, case.wr, ALPHAS[5], forbidden, impl=impl, return_stats=True
    )
    assert labels.shape == labels_s.shape == lse.shape == best.shape == (0, 5)
    assert labels.dtype == torch.long and lse.dtype == best.dtype == torch.float32


def test_triton_is_deterministic():
    case = make_case("forbidden_blocked", torch.float32)
    first, second = (case.run("triton", ALPHAS[5], return_stats=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_auto_is_chunked_on_cpu(monkeypatch):
    import kernels.mixing

    calls = []
    real = kernels.mixing.generic_labels_chunked
    monkeypatch.setattr(kernels.mixing, "generic_labels_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case("random", torch.float32)
    generic_labels(case.hb.cpu(), case.wb.cpu(), case.hr.cpu(), case.wr.cpu(), [1.0])
    assert calls == [1]


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        generic_labels(x, w, x, w, [1.0], impl="triton")


def test_importing_kernels_needs_no_triton():
    code = (
        "import sys, torch, kernels; "
        "x, w = torch.randn(3, 4), torch.randn(5, 4); "
        "kernels.generic_labels(x, w, x, w, [1.0]); "
        "assert 'triton' not in sys.modules, 'kernels imported triton'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _bad_inputs():
    x, w, f = torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, 1, dtype=torch.long)
    return {
        "hb/hr shapes": ((x, w, torch.zeros(3, 4), w, [1.0], None), "hb and hr"),
        "hidden 1-D": ((x[0], w, x[0], w, [1.0], None), "hb and hr"),
        "W width": ((x, w, x, torch.zeros(3, 5), [1.0], None), "wb and wr"),
        "empty vocabulary": ((x, w[:0], x, w[:0], [1.0], None), "vocabulary is empty"),
        "hidden dtypes": ((x, w, x.half(), w, [1.0], None), "dtype mismatch"),
        "weight dtypes": ((x, w, x, w.double(), [1.0], None), "dtype mismatch"),
        "integer hidden": ((x.long(), w, x.long(), w, [1.0], None), "floating point"),
        "no alphas": ((x, w, x, w, [], None), "alphas"),
        "negative alpha": ((x, w, x, w, [1.0, -1.0], None), "alphas"),
        "forbidden rows": ((x, w, x, w, [1.0], f[:1]), "forbidden must be"),
        "forbidden float": ((x, w, x, w, [1.0], f.float()), "integer token ids"),
        "forbidden bool": ((x, w, x, w, [1.0], f.bool()), "integer token ids"),
        "forbidden id >= V": ((x, w, x, w, [1.0], f + 3), r"forbidden ids must be in \[0, 3\)"),
        "forbidden id < -1": ((x, w, x, w, [1.0], f - 2), "forbidden ids"),
        "devices": ((x, w, x, w, [1.0], f.to("meta")), "one device"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
def test_invalid_inputs_are_refused_clearly(name, impl):
    args, message = _bad_inputs()[name]
    with pytest.raises(ValueError, match=message):
        generic_labels(*args, impl=impl)


def test_unknown_impl():
    x, w = torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="unknown impl"):
        generic_labels(x, w, x, w, [1.0], impl="cuda")


def test_chunk_width_bounds_the_work_buffers():
    for n, h, cast in ((512, 4096, False), (8192, 4096, True), (1, 64, False)):
        chunk = kernels.chunked.default_chunk(n, h, cast)
        assert kernels.chunked.MIN_CHUNK <= chunk <= kernels.chunked.MAX_CHUNK
        if chunk > kernels.chunked.MIN_CHUNK:
            assert 4 * chunk * (3 * n + (2 * h if cast else 0)) <= kernels.chunked.CHUNK_BUDGET_BYTES
