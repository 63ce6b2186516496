"""Memorization metrics on models whose greedy next token is set by hand, so every answer is known."""

from types import SimpleNamespace

import pytest
import torch
from rouge_score import rouge_scorer

from builders import tiny_llama
from configs.errors import UserError
from configs.schema import EvalConfig
from engine.evaluation.memorization import (
    band_outliers,
    extraction_likelihood,
    memorization_accuracy,
    outliers,
    rouge_l,
    verbatim_rouge,
)

VOCAB = 16


class ShiftModel(torch.nn.Module):
    """Predicts that the next token is the current one plus `shift`: 0 copies, 1 counts."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives `model_device` a parameter to read

    def forward(self, input_ids, attention_mask=None, **_):  # no state: fed one new token, it needs no cache
        return SimpleNamespace(logits=torch.nn.functional.one_hot((input_ids + self.shift) % VOCAB, VOCAB).float(), cache=None)


COPY, COUNT = ShiftModel(0), ShiftModel(1)
# Counting model on this sequence: it continues 1 2 3 4 with 5 6 ..., so it leaves the text after the 4.
DIVERGING = [1, 2, 3, 4, 9, 9]


def test_copy_model_recites_constant_sequences_and_misses_increasing_ones():
    constant = [[5] * 6, [7] * 9]  # unequal lengths share a batch
    assert memorization_accuracy(COPY, constant, prefix_length=2) == [1.0, 1.0]
    assert extraction_likelihood(COPY, constant, n=2) == [1.0, 1.0]
    assert verbatim_rouge(COPY, constant, prefix_length=2, continuation_length=3) == [1.0, 1.0]
    assert memorization_accuracy(COPY, [[1, 2, 3, 4, 5]], prefix_length=1) == [0.0]


def test_counting_model_on_a_diverging_sequence():
    assert memorization_accuracy(COUNT, [[1, 2, 3, 4, 5, 6]], prefix_length=1) == [1.0]
    # Teacher forcing on DIVERGING from t=2: predicts 3 4 5 10 against 3 4 9 9.
    assert memorization_accuracy(COUNT, [DIVERGING], prefix_length=2) == [0.5]


def test_extraction_likelihood_by_hand():
    # EL_2 on DIVERGING (T=6), t = 1..4; generated continuation vs true suffix, hits among generated bigrams:
    #   t=1: 2 3 4 5 6 vs 2 3 4 9 9 -> (2,3) (3,4) of 4 bigrams = 1/2
    #   t=2:   3 4 5 6 vs   3 4 9 9 -> (3,4) of 3               = 1/3
    #   t=3:     4 5 6 vs     4 9 9 -> none                     = 0
    #   t=4:       5 6 vs       9 9 -> none                     = 0
    # EL_2 = (1/2 + 1/3) / 4 = 5/24; with stride 2, t = 1 and 3 only: (1/2 + 0) / 2.
    assert extraction_likelihood(COUNT, [DIVERGING], n=2) == [pytest.approx(5 / 24)]
    assert extraction_likelihood(COUNT, [DIVERGING], n=2, stride=2) == [pytest.approx(1 / 4)]
    assert extraction_likelihood(COUNT, [DIVERGING], n=2, batch_size=1) == [pytest.approx(5 / 24)]


def test_extraction_likelihood_counts_repeated_generated_ngrams_against_the_suffix_set():
    # Copy model on 3 3 3 7, n=1: t=1 generates 3 3 3 vs 3 3 7 -> 3 of 3 unigrams occur in the suffix;
    # t=2 generates 3 3 vs 3 7 -> 2/2; t=3 generates 3 vs 7 -> 0. EL_1 = (1 + 1 + 0) / 3.
    assert extraction_likelihood(COPY, [[3, 3, 3, 7]], n=1) == [pytest.approx(2 / 3)]


def test_verbatim_rouge_by_hand():
    # Prefix 1 2; the counting model generates 3 4 5 6 against 3 4 9 9: LCS 2 of 4 -> P = R = F1 = 1/2.
    assert verbatim_rouge(COUNT, [DIVERGING], prefix_length=2, continuation_length=4) == [0.5]
    # A continuation longer than the sequence is cut at its end: the same 4 tokens.
    assert verbatim_rouge(COUNT, [DIVERGING], prefix_length=2, continuation_length=50) == [0.5]
    # Only the first 2 continuation tokens: 3 4 vs 3 4.
    assert verbatim_rouge(COUNT, [DIVERGING], prefix_length=2, continuation_length=2) == [1.0]


def test_rouge_l_by_hand():
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([], [3, 4]) == 0.0
    # LCS of 1 2 3 4 and 1 3 5 is 1 3: P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7.
    assert rouge_l([1, 2, 3, 4], [1, 3, 5]) == pytest.approx(4 / 7)
    # A subsequence, not a substring: 5 1 2 3 and 1 2 3 5 share 1 2 3 (LCS 3 of 4).
    assert rouge_l([5, 1, 2, 3], [1, 2, 3, 5]) == pytest.approx(3 / 4)


def test_rouge_l_matches_the_rouge_score_package_on_one_word_per_id():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        prediction, reference = (torch.randint(0, 6, (int(torch.randint(1, 12, ())),), generator=generator).tolist()
                                 for _ in range(2))
        words = [" ".join(f"w{i}" for i in ids) for ids in (reference, prediction)]
        assert rouge_l(prediction, reference) == pytest.approx(scorer.score(*words)["rougeL"].fmeasure)


def test_outliers_count_scores_strictly_above_the_reference_quantile():
    reference = list(range(11))  # 0..10: the 0.9 quantile is exactly 9
    found = outliers([1, 9, 9.5, 10, 20], reference, quantile=0.9)
    assert found == {"threshold": 9.0, "count": 3, "fraction": 0.6}
    # Between order statistics: 0.95 of 0..10 is 9.5, so 9.5 itself no longer counts.
    assert outliers([1, 9, 9.5, 10, 20], reference)["count"] == 2


def test_band_outliers_count_both_ends_boundaries_included():
    # g <= 0.15 below: 0.0, 0.1, 0.15; g >= 0.6 above: 0.6, 0.95, 1.0; inside: 0.16, 0.3, 0.59 -> 6 of 9.
    found = band_outliers([0.0, 0.1, 0.15, 0.16, 0.3, 0.59, 0.6, 0.95, 1.0])
    assert found == {"low": 0.15, "high": 0.6, "count": 6, "fraction": 6 / 9, "below": 3, "above": 3}
    # A narrower band: [0.5, 0.7] leaves 0.59 and 0.6 inside; 0.16 and 0.3 fall below.
    narrow = band_outliers([0.0, 0.1, 0.15, 0.16, 0.3, 0.59, 0.6, 0.95, 1.0], low=0.5, high=0.7)
    assert (narrow["below"], narrow["above"], narrow["count"]) == (5, 2, 7)
    assert band_outliers([0.3, 0.4], low=0.0, high=1.0)["count"] == 0  # the widest band: only 0 and 1 count
    assert band_outliers([0.0, 1.0], low=0.0, high=1.0)["count"] == 2


@pytest.mark.parametrize("band", [[0.6, 0.15], [0.3, 0.3], [-0.1, 0.5], [0.2, 1.5], [0.15], [0.1, 0.2, 0.3], ["low", 0.6]])
def test_bad_outlier_band_is_a_one_line_user_error(band):
    with pytest.raises(UserError, match="eval.outlier_band must be two numbers") as error:
        EvalConfig(outlier_band=band).validate()
    assert "\n" not in str(error.value)
    EvalConfig(outlier_band=[0.0, 1.0]).validate()


def greedy_alone(model, prefix: list[int], total: int) -> list[int]:
    """Reference greedy decoding: one unpadded sequence, one full forward pass per new token."""
    ids = list(prefix)
    while len(ids) < total:
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_tiny_llama_recites_its_own_greedy_text_with_unequal_lengths_in_a_batch():
    model = tiny_llama(32, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        own = [greedy_alone(model, [4, 9, 17], total) for total in (6, 12, 9)]
    noise = [torch.randint(0, 32, (length,), generator=generator).tolist() for length in (5, 11)]
    sequences = own + noise
    runs = {
        "accuracy": lambda b: memorization_accuracy(model, sequences, prefix_length=3, batch_size=b),
        "el": lambda b: extraction_likelihood(model, sequences, n=2, batch_size=b, stride=2),
        "rouge": lambda b: verbatim_rouge(model, sequences, prefix_length=3, continuation_length=8, batch_size=b),
    }
    scores = {name: run(3) for name, run in runs.items()}
    assert scores["accuracy"][:3] == [1.0, 1.0, 1.0]
    assert scores["rouge"][:3] == [1.0, 1.0, 1.0]
    for name, run in runs.items():
        assert len(scores[name]) == len(sequences), name
        assert all(0.0 <= score <= 1.0 for score in scores[name]), name
        assert scores[name] == run(1), name  # right padding changes no row's greedy tokens


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: memorization_accuracy(COPY, [[1, 2, 3, 4], [1, 2, 3]], prefix_length=3), "sequence 1 has 3 tokens"),
        (lambda: verbatim_rouge(COPY, [[1, 2]], prefix_length=2, continuation_length=4), "sequence 0 has 2 tokens"),
        (lambda: extraction_likelihood(COPY, [[1, 2]], n=2), "sequence 0 has 2 tokens; n=2"),
        (lambda: memorization_accuracy(COPY, [[1, 2]], prefix_length=0), "prefix_length must be at least 1"),
        (lambda: extraction_likelihood(COPY, [[1, 2, 3]], n=1, stride=0), "stride must be at least 1"),
        (lambda: outliers([], [1.0]), "at least one score"),
        (lambda: outliers([1.0], [1.0], quantile=95), "between 0 and 1"),
        (lambda: band_outliers([]), "at least one memorization accuracy"),
        (lambda: band_outliers([0.5], low=0.6, high=0.15), "0 <= low < high <= 1"),
    ],
)
def test_bad_input_is_a_one_line_user_error(call, message):
    with pytest.raises(UserError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
