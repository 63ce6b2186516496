"""Membership-inference and oracle-closeness metrics on hand-made scores and models with known probabilities."""

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

from builders import tiny_llama
from configs.errors import UserError
from configs.schema import EvalConfig
from engine.evaluation.privacy import (
    _draw,
    ks_forget_quality,
    mia_auc,
    mia_scores,
    perturb,
    perturbation_plan,
    perturbation_scores,
    privleak,
    roc_curve_points,
)

SEEN = [0.1, 0.2, 0.3]  # low scores: looks like training data
UNSEEN = [0.7, 0.8, 0.9]


class BigramStub(torch.nn.Module):
    """Next-token log-probabilities after token t are exactly `table[t]`, whatever came before."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # `model_device` reads the first parameter
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False, logits_to_keep=0):
        """Context-free, so a key/value cache is nothing to keep: the one passed in is handed back."""
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, cache=cache)


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


def flip_stub() -> BigramStub:
    """Two tokens: after 0, P(0) = 0.9 and P(1) = 0.1; after 1, a coin. Excluding the original token leaves
    one choice, so a perturbation flips exactly the tokens at its positions, whatever the draws."""
    return BigramStub(torch.tensor([[0.9, 0.1], [0.5, 0.5]]).log())


def test_perturbation_score_by_hand():
    model = flip_stub()
    # Length 3 with spans of 2: the one span is positions 1-2, so every copy is 0 1 1 (the first token stays).
    assert perturb(model, [[0, 0, 0]], [perturbation_plan(3, 0.15, 2, torch.Generator())]) == [[0, 1, 1]]
    ll, ll_copy = math.log(0.9), (math.log(0.1) + math.log(0.5)) / 2
    assert perturbation_scores(model, [[0, 0, 0]], copies=3, span=2) == [pytest.approx(-abs(ll - ll_copy))]
    # Length 5, fraction 1: both spans, 0 1 1 1 1, whose mean log-likelihood is (log .1 + 3 log .5) / 4.
    ll_copy = (math.log(0.1) + 3 * math.log(0.5)) / 4
    assert perturbation_scores(model, [[0] * 5], copies=2, fraction=1.0, span=2) == [pytest.approx(-abs(ll - ll_copy))]


def test_perturbation_auc_is_1_when_the_forget_set_sits_at_the_likelihood_peak():
    # Forget 0 0 0 -> 0 1 1: LL falls by 1.39. Holdout 1 1 1 -> 1 0 0: LL rises by 0.29. Larger discrepancy
    # = member, so the forget set scores lower (scores here: higher = unseen) and the AUC is 1.
    model = flip_stub()
    forget = perturbation_scores(model, [[0, 0, 0], [0, 0, 0]], copies=2, span=2)
    holdout = perturbation_scores(model, [[1, 1, 1], [1, 1, 1]], copies=2, span=2)
    member = abs(math.log(0.9) - (math.log(0.1) + math.log(0.5)) / 2)  # 1.39
    unseen = abs(math.log(0.5) - (math.log(0.5) + math.log(0.9)) / 2)  # 0.29
    assert forget == pytest.approx([-member] * 2) and holdout == pytest.approx([-unseen] * 2)
    assert mia_auc(forget, holdout) == 1.0
    assert mia_auc(holdout, forget) == 0.0


def test_perturbation_plan_picks_whole_spans_after_the_first_token():
    plan = perturbation_plan(64, 0.15, 2, torch.Generator().manual_seed(3))
    positions, uniforms = plan
    assert len(uniforms) == len(positions) and all(0 <= u < 1 for u in uniforms)
    assert positions == sorted(set(positions)) and positions[0] >= 1 and positions[-1] <= 63
    starts = [p for p in positions if p % 2 == 1]
    assert len(starts) == 5  # round(0.15 * 63 / 2) spans of 2 on the grid 1-2, 3-4, ..., 63
    assert all(p + 1 in positions for p in starts if p < 63) and all(p - 1 in positions for p in positions if p % 2 == 0)
    assert perturbation_plan(64, 0.15, 2, torch.Generator().manual_seed(3)) == plan
    assert perturbation_plan(64, 0.15, 2, torch.Generator().manual_seed(4)) != plan
    assert perturbation_plan(4, 0.01, 8, torch.Generator())[0] == [1, 2, 3]  # at least one span, cut at the end


def test_perturbed_copies_differ_exactly_at_the_plan_positions_and_are_reproducible():
    model = tiny_llama(vocab_size=40, seed=0)
    sequences = [[1, *range(2, 30)], [1, 5, 9, 3, 3, 3], [1, 7], [1, *range(10, 0, -1)]]
    generator = torch.Generator().manual_seed(0)
    plans = [perturbation_plan(len(seq), 0.3, 2, generator) for seq in sequences]
    copies = perturb(model, sequences, plans, batch_size=3)
    for seq, copy, (positions, _) in zip(sequences, copies, plans):
        assert len(copy) == len(seq) and copy[0] == seq[0]
        assert [i for i, (a, b) in enumerate(zip(seq, copy)) if a != b] == positions
    assert perturb(model, sequences, plans, batch_size=1) == copies  # the draws do not depend on batching
    assert copies == perturbed_without_cache(model, sequences, plans)
    scores = perturbation_scores(model, sequences, copies=2, seed=5)
    assert scores == pytest.approx(perturbation_scores(model, sequences, copies=2, seed=5, batch_size=1), abs=1e-5)
    assert scores != perturbation_scores(model, sequences, copies=2, seed=6)
    assert all(score <= 0 for score in scores)


def perturbed_without_cache(model, sequences, plans):
    """`perturb` by its definition: one sequence at a time, a forward of the whole prefix per resampled position."""
    out = []
    with torch.no_grad():
        for seq, (positions, uniforms) in zip(sequences, plans):
            ids = torch.tensor([seq])
            for at, uniform in zip(positions, uniforms):
                probs = model(input_ids=ids[:, :at]).logits[:, -1].double().softmax(-1)
                ids[:, at] = _draw(probs, ids[:, at], torch.tensor([uniform], dtype=torch.float64))
            out.append(ids[0].tolist())
    return out


@pytest.mark.parametrize(
    "settings, fragment",
    [({"perturbations": -1}, "eval.perturbations must be >= 0"), ({"perturb_fraction": 0.0}, "eval.perturb_fraction must be in (0, 1]"),
     ({"perturb_fraction": 1.5}, "eval.perturb_fraction must be in (0, 1]"), ({"perturb_span": 0}, "eval.perturb_span must be > 0")],
)
def test_bad_perturbation_settings_are_one_line_user_errors(settings, fragment):
    with pytest.raises(UserError) as error:
        EvalConfig(**settings).validate()
    assert fragment in str(error.value) and "\n" not in str(error.value)
    EvalConfig(perturbations=0).validate()  # 0: no perturbation attack


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
        lambda: perturbation_scores(BigramStub(torch.zeros(4, 4)), [[1, 2], [3]]),
        lambda: perturbation_scores(BigramStub(torch.zeros(4, 4)), [[1, 2]], copies=0),
        lambda: perturbation_scores(BigramStub(torch.zeros(4, 4)), [[1, 2]], span=0),
        lambda: perturbation_scores(BigramStub(torch.zeros(4, 4)), [[1, 2]], fraction=0.0),
    ],
)
def test_bad_input_is_a_one_line_user_error(call):
    with pytest.raises(UserError) as error:
        call()
    assert "\n" not in str(error.value)
