"""Membership-inference and oracle-closeness metrics on hand-made scores and models with known probabilities."""

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

from builders import tiny_llama
from configs.errors import UserError
from engine.evaluation.privacy import ks_forget_quality, mia_auc, mia_scores, privleak, roc_curve_points

SEEN = [0.1, 0.2, 0.3]  # low scores: looks like training data
UNSEEN = [0.7, 0.8, 0.9]


class BigramStub(torch.nn.Module):
    """Next-token log-probabilities after token t are exactly `table[t]`, whatever came before."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # `model_device` reads the first parameter
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def successor_stub(vocab: int, p: float) -> BigramStub:
    """Token t is followed by t+1 (mod vocab) with probability p, by each other token with (1-p)/(vocab-1)."""
    table = torch.full((vocab, vocab), math.log((1 - p) / (vocab - 1)))
    table[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = math.log(p)
    return BigramStub(table)


def test_auc_separated_reversed_and_identical():
    assert mia_auc(SEEN, UNSEEN) == 1.0
    assert mia_auc(UNSEEN, SEEN) == 0.0
    assert mia_auc(SEEN, SEEN) == 0.5


def test_roc_curve_of_separated_scores_passes_through_the_corner():
    fpr, tpr = roc_curve_points(SEEN, UNSEEN)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (0.0, 1.0) in zip(fpr, tpr)


def test_ks_identical_and_shifted_losses():
    losses = [float(x) for x in range(20)]
    assert ks_forget_quality(losses, losses) == {"statistic": 0.0, "p_value": 1.0}
    shifted = ks_forget_quality(losses, [x + 50 for x in losses])
    assert shifted["statistic"] == 1.0 and shifted["p_value"] < 0.01


def test_privleak_hand_computed():
    assert privleak(0.6, 0.6) == 0.0
    assert privleak(0.7, 0.6) == pytest.approx((0.6 - 0.7) / 0.4)  # -0.25: forget still looks seen
    assert privleak(1.0, 0.5) == -1.0  # fully memorised: MUSE's target model, about -100%
    assert privleak(0.0, 0.5) == 1.0  # forget looks less familiar than unseen text: over-unlearning
    assert math.isnan(privleak(0.7, 1.0))


def test_uniform_model_scores_log_vocab():
    vocab = 8
    sequences = [[1, 2, 3], [4, 5, 6, 7, 0, 1], [2, 2]]
    texts = ["one two three", "a longer text, a longer text, a longer text", "hi"]
    scores = mia_scores(BigramStub(torch.zeros(vocab, vocab)), sequences, texts, batch_size=2)
    assert scores["loss"] == pytest.approx([math.log(vocab)] * 3)
    assert scores["min_k"] == pytest.approx([math.log(vocab)] * 3)
    expected_zlib = [math.log(vocab) / len(zlib.compress(text.encode("utf-8"))) for text in texts]
    assert scores["zlib"] == pytest.approx(expected_zlib)
    assert "zlib" not in mia_scores(BigramStub(torch.zeros(vocab, vocab)), sequences)


def test_min_k_averages_the_lowest_token_log_probs():
    hit, miss = math.log(0.7), math.log(0.1)  # vocab 4: the 3 non-successors share 0.3
    sequence = [0, 1, 2, 0, 3, 0]  # hit, hit, miss, miss, hit
    model = successor_stub(4, 0.7)
    loss = -(3 * hit + 2 * miss) / 5
    assert mia_scores(model, [sequence], k=0.4)["min_k"] == pytest.approx([-miss])
    assert mia_scores(model, [sequence], k=0.6)["min_k"] == pytest.approx([-(2 * miss + hit) / 3])
    assert mia_scores(model, [sequence], k=0.1)["min_k"] == pytest.approx([-miss])  # at least one token
    only = mia_scores(model, [sequence], k=1.0)
    assert only["min_k"] == pytest.approx(only["loss"]) and only["loss"] == pytest.approx([loss])


def test_memorised_forget_set_gives_auc_1_and_privleak_minus_1():
    model = successor_stub(5, 0.9)
    forget = [[0, 1, 2, 3], [2, 3, 4, 0, 1]]  # the pattern the model learned
    holdout = [[0, 2, 4, 1], [3, 1, 4, 2, 0]]
    for name in ("loss", "min_k"):
        auc = mia_auc(mia_scores(model, forget)[name], mia_scores(model, holdout)[name])
        assert auc == 1.0
        assert privleak(auc, 0.5) == -1.0


def test_tiny_llama_unequal_lengths_batched_like_one_by_one():
    model = tiny_llama(vocab_size=40, seed=0)
    sequences = [[1, 5, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    texts = ["a b c", "d e f g h i j k l", "m n", "o p q r"]
    batched = mia_scores(model, sequences, texts, batch_size=3)
    single = mia_scores(model, sequences, texts, batch_size=1)
    assert set(batched) == {"loss", "zlib", "min_k"}
    for name, values in batched.items():
        assert len(values) == len(sequences) and all(math.isfinite(v) for v in values)
        assert values == pytest.approx(single[name], abs=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: mia_auc([], UNSEEN),
        lambda: mia_auc(SEEN, []),
        lambda: roc_curve_points([], UNSEEN),
        lambda: ks_forget_quality([], [1.0]),
        lambda: mia_scores(BigramStub(torch.zeros(4, 4)), []),
        lambda: mia_scores(BigramStub(torch.zeros(4, 4)), [[1, 2], [3]]),
        lambda: mia_scores(BigramStub(torch.zeros(4, 4)), [[1, 2]], texts=["a", "b"]),
        lambda: mia_scores(BigramStub(torch.zeros(4, 4)), [[1, 2]], k=0.0),
    ],
)
def test_bad_input_is_a_one_line_user_error(call):
    with pytest.raises(UserError) as error:
        call()
    assert "\n" not in str(error.value)
