"""Chunked PyTorch path: one pass over the vocabulary in column chunks with running reductions.

The CPU default and the portable fallback. Per row and α it keeps a running (max, argmax) over the
non-forbidden tokens, a running sum of b (for the forbidden mean) and, when stats are asked for, a
running logsumexp; forbidden ids are settled at the end by `settle_forbidden`, which the Triton path
shares. Extra memory is O(N·chunk) (+ O(chunk·H) when the weights are not fp32 and must be cast).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
CHUNK_BUDGET_BYTES = 8 << 20  # fp32 work buffers per chunk; sets the default chunk width
MIN_CHUNK, MAX_CHUNK = 128, 4096


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values by construction: the same object, or the same view of the same storage."""
    return a is b or (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def default_chunk(n: int, h: int, cast_weights: bool, *, buffers: int = 3, heads: int = 2) -> int:
    """Columns per chunk within the budget: `buffers` fp32 [N, chunk] work buffers (the label kernel's three:
    b, r/excess, mixed) plus, for non-fp32 weights, the fp32 casts of `heads` weight chunks of width h."""
    per_column = 4 * (buffers * max(n, 1) + (heads * h if cast_weights else 0))
    chunk = CHUNK_BUDGET_BYTES // per_column
    return int(min(MAX_CHUNK, max(MIN_CHUNK, chunk // MIN_CHUNK * MIN_CHUNK)))


def generic_labels_chunked(hb, wb, hr, wr, alphas, forbidden=None, *, return_stats=False, chunk_size=None):
    n, h = hb.shape
    v = wb.shape[0]
    device = hb.device
    a_count = len(alphas)
    shared_w = same_tensor(wb, wr)
    same_inputs = shared_w and same_tensor(hb, hr)  # r == b: no excess outside the forbidden ids
    chunk = chunk_size or default_chunk(n, h, wb.dtype != torch.float32)

    hb32 = hb.float()
    hr32 = hr.float()
    stacked = torch.cat([hb32, hr32]) if shared_w and not same_inputs else None  # one matmul per W chunk
    buf_br = torch.empty((1 if same_inputs else 2) * n * chunk, device=device)  # b and r chunks
    buf_mixed = torch.empty(n * chunk, device=device)

    best = torch.full((n, a_count), NEG_INF, device=device)
    arg = torch.zeros((n, a_count), dtype=torch.long, device=device)
    lse = torch.full((n, a_count), NEG_INF, device=device) if return_stats else None
    row_sum = torch.zeros(n, device=device)

    pairs = _ForbiddenPairs(forbidden, v, chunk) if forbidden is not None else None
    r_forbidden = torch.zeros(forbidden.shape, device=device) if pairs is not None else None

    for v0 in range(0, v, chunk):
        v1 = min(v0 + chunk, v)
        c = v1 - v0
        wb_c = wb[v0:v1].float()
        if stacked is not None:
            br = torch.mm(stacked, wb_c.T, out=buf_br[: 2 * n * c].view(2 * n, c))
            b, r = br[:n], br[n:]
        else:
            b = torch.mm(hb32, wb_c.T, out=buf_br[: n * c].view(n, c))
            r = None if same_inputs else torch.mm(hr32, wr[v0:v1].float().T, out=buf_br[n * c : 2 * n * c].view(n, c))
        row_sum += b.sum(dim=1)

        rows, ks, cols = pairs.chunk(v0 // chunk) if pairs is not None else (None, None, None)
        if rows is not None:
            r_forbidden[rows, ks] = (b if r is None else r)[rows, cols]
        excess = None if r is None else r.sub_(b).clamp_(min=0)  # r is dead from here on

        for i, alpha in enumerate(alphas):
            mixed = buf_mixed[: n * c].view(n, c)
            if excess is None:
                mixed.copy_(b)
            else:
                torch.add(b, excess, alpha=-alpha, out=mixed)
            if rows is not None:
                mixed[rows, cols] = NEG_INF
            value, index = mixed.max(dim=1)  # first maximal index within the chunk
            better = value > best[:, i]  # strictly: an earlier chunk keeps its (smaller) id on ties
            best[:, i] = torch.where(better, value, best[:, i])
            arg[:, i] = torch.where(better, index + v0, arg[:, i])
            if return_stats:
                lse[:, i] = torch.logaddexp(lse[:, i], torch.logsumexp(mixed, dim=1))

    return settle_forbidden(best, arg, lse, row_mean(row_sum, v), r_forbidden, forbidden, alphas, return_stats)


class _ForbiddenPairs:
    """The valid (row, slot, id) triples of `forbidden`, sorted by id so each chunk takes a slice."""

    def __init__(self, forbidden: torch.Tensor, v: int, chunk: int):
        rows, ks = torch.nonzero(forbidden >= 0, as_tuple=True)
        ids, order = forbidden[rows, ks].long().sort(stable=True)
        self.rows, self.ks, self.ids, self.width = rows[order], ks[order], ids, chunk
        starts = torch.arange(0, v + chunk, chunk, device=ids.device)
        self.bounds = torch.searchsorted(ids, starts).tolist()  # one host sync for all chunks

    def chunk(self, index: int):
        """(rows, slots, columns within the chunk) of the forbidden ids in chunk `index`, or Nones."""
        lo, hi = self.bounds[index], self.bounds[index + 1]
        if lo == hi:
            return None, None, None
        return self.rows[lo:hi], self.ks[lo:hi], self.ids[lo:hi] - index * self.width


def row_mean(row_sum: torch.Tensor, count: int) -> torch.Tensor:
    """row_sum / count, correctly rounded on every device (all paths share it, so their means agree bit for bit).

    Dividing a CUDA tensor by a Python number multiplies by the reciprocal: 246 / 123 comes out 1 ulp below 2.
    A tensor divisor takes the IEEE division path.
    """
    return row_sum / torch.full_like(row_sum, count)


def settle_forbidden(best, arg, lse, mean, r_forbidden, forbidden, alphas, return_stats):
    """Fold the forbidden ids into the running results once the row mean is known.

    best/arg/lse [N, A]: over the NON-forbidden ids; mean [N]; r_forbidden [N, K]: r at each forbidden
    slot (ignored for -1 padding). A forbidden id's mixed value is mean − α·relu(r − mean). Ties keep
    the smallest id; duplicated ids count once in the logsumexp.
    """
    if forbidden is not None and forbidden.numel():
        ids, order = forbidden.long().sort(dim=1)
        r_sorted = r_forbidden.gather(1, order)
        unique = ids >= 0
        unique[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        alpha = torch.tensor(list(alphas), dtype=torch.float32, device=best.device)
        excess = torch.relu(r_sorted - mean[:, None])  # [N, K]
        mixed = mean[:, None, None] - alpha * excess[:, :, None]  # [N, K, A]
        mixed = mixed.masked_fill(~unique[:, :, None], NEG_INF)
        f_best, f_slot = mixed.max(dim=1)  # ids sorted ascending: the first maximal slot is the smallest id
        f_id = ids.gather(1, f_slot)
        take = (f_best > best) | ((f_best == best) & (f_id < arg) & (f_best > NEG_INF))
        best = torch.where(take, f_best, best)
        arg = torch.where(take, f_id, arg)
        if return_stats:
            lse = torch.logaddexp(lse, torch.logsumexp(mixed, dim=1))
    if return_stats:
        return arg, lse, best
    return arg
