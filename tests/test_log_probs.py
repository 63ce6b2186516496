"""`kernels.token_log_probs` against the fp32 reference: odd shapes, chunks that do not divide the vocabulary,
three dtypes with their tolerances."""

import pytest
import torch

from kernels import token_log_probs
from kernels.log_probs import token_log_probs_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # absolute, on log-probabilities


@pytest.mark.parametrize("dtype", TOL, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n, h, v, chunk", [(1, 5, 1, None), (7, 24, 130, 16), (33, 8, 1000, 333), (4, 16, 257, 1024)])
def test_chunked_log_probs_match_the_materialized_reference(dtype, n, h, v, chunk):
    g = torch.Generator().manual_seed(n * v)
    hidden, weight = torch.randn(n, h, generator=g).to(dtype), (2 * torch.randn(v, h, generator=g)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    want = token_log_probs_reference(hidden, weight, targets)
    got = token_log_probs(hidden, weight, targets, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL[dtype] * max(1.0, float(want.abs().max())))
    assert (got <= 1e-6).all()


def test_a_one_token_vocabulary_is_certain_and_large_logits_do_not_overflow():
    hidden = torch.tensor([[1.0, 2.0]])
    assert float(token_log_probs(hidden, torch.tensor([[3.0, -1.0]]), torch.tensor([0]))) == pytest.approx(0.0)
    big = torch.tensor([[1e4, 0.0], [1e4 - 1.0, 0.0]])  # logits 1e4 and 1e4 − 1 for a hidden of [1, 0]
    got = token_log_probs(torch.tensor([[1.0, 0.0]]), big, torch.tensor([1]), chunk_size=1)
    assert float(got) == pytest.approx(-1.0 - torch.log1p(torch.exp(torch.tensor(-1.0))).item(), abs=1e-4)
