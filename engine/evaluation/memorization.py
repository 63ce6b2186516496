"""Memorization metrics: does the model still reproduce the forget-set text token for token?

Familiarity (suite.py) asks whether the model still *knows* about the target; these ask
whether it can still *recite* it, the verbatim leak that unlearning papers measure: memorization accuracy
and extraction likelihood (Jang et al. 2022, "Knowledge Unlearning for Mitigating Privacy Risks in
Language Models") and MUSE's verbatim memorization (Shi et al. 2024). All work on token ids, so they do
not depend on how a tokenizer splits words, and all decode greedily, so they are deterministic.
"""

from __future__ import annotations

import torch

from configs.errors import UserError
from engine.evaluation.inference import batches, inference, left_padded, model_device, next_token_log_probs
from engine.training.objectives import memorization_scores


def memorization_accuracy(model, sequences: list[list[int]], prefix_length: int, batch_size: int = 8) -> list[float]:
    """Per sequence, the fraction of tokens after the first `prefix_length` that are the argmax next token
    given the true text before them (teacher forcing), as in Tirumala et al. 2022 and Jang et al. 2022.
    """
    _check(sequences, "prefix_length", prefix_length)
    scores = []
    with inference(model):
        rows = next_token_log_probs(model, sequences, batch_size, "memorization accuracy")
        for seq, log_probs in zip(sequences, rows):
            scores.append(memorization_scores(log_probs[None], torch.tensor([seq]), prefix_length).item())
    return scores


def extraction_likelihood(
    model, sequences: list[list[int]], n: int, batch_size: int = 8, stride: int = 1
) -> list[float]:
    """Per sequence x of T tokens, EL_n(x) = 1/(T-n) Σ_{t=1}^{T-n} overlap_n(f(x[:t]), x[t:]) (Jang et al. 2022).

    f(x[:t]) is the greedy continuation of the prefix, as long as the true suffix x[t:]. overlap_n counts
    as the authors' code does: each n-gram position of the continuation scores 1 if that n-gram occurs
    anywhere in the suffix (set membership, so repeats in the continuation count again), divided by the
    number of positions (the same for both, as the lengths are equal). It rewards recalling the text even
    after one wrong token, which memorization accuracy and exact match miss. `stride` scores every
    stride-th t only and averages over those: the cost is one greedy decode per scored t.
    """
    _check(sequences, "n", n, stride=stride)
    scores = []
    with inference(model):
        # A batch of sequences at a time (the unit ranks share), its prefixes by length: full decode batches
        # whose rows decode about as long, the same batches in one process as on a rank.
        for first in range(0, len(sequences), batch_size):
            group = sequences[first : first + batch_size]
            scored = sorted(((t, index) for index, seq in enumerate(group) for t in range(1, len(seq) - n + 1, stride)))
            generated = _greedy(model, [group[i][:t] for t, i in scored], [len(group[i]) for _, i in scored], batch_size, "extraction likelihood")
            overlaps: list[list[float]] = [[] for _ in group]
            for (t, index), continuation in zip(scored, generated):
                overlaps[index].append(_ngram_overlap(continuation, group[index][t:], n))
            scores += [sum(found) / len(found) for found in overlaps]
    return scores


def verbatim_rouge(
    model, sequences: list[list[int]], prefix_length: int, continuation_length: int, batch_size: int = 8
) -> list[float]:
    """MUSE's verbatim memorization: ROUGE-L F1 between the greedy continuation of the first
    `prefix_length` tokens and the true next `continuation_length` tokens (fewer where the sequence ends).

    MUSE scores decoded words with the rouge-score package and stops at EOS; this scores token ids
    (`rouge_l`) and always generates as many tokens as the true continuation has.
    """
    _check(sequences, "prefix_length", prefix_length, continuation_length=continuation_length)
    ends = [min(len(seq), prefix_length + continuation_length) for seq in sequences]
    with inference(model):
        generated = _greedy(model, [seq[:prefix_length] for seq in sequences], ends, batch_size, "verbatim rouge")
    return [rouge_l(g, seq[prefix_length:end]) for g, seq, end in zip(generated, sequences, ends)]


def rouge_l(prediction: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 on id lists: the longest common subsequence's harmonic-mean precision and recall.

    Ids rather than words: no tokenizer-dependent word split, stemming or case folding stands between the
    model's output and the score.
    """
    lcs = _lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def outliers(scores: list[float], reference_scores: list[float], quantile: float = 0.95) -> dict:
    """How many forget-set sequences score above the `quantile` of the same score on unseen text.

    A mean can look forgotten while a few sequences are still recited verbatim; this counts them against
    what the model does on text it never saw. The threshold interpolates linearly between order
    statistics (numpy's default); a score counts only if strictly above it.
    """
    if not scores or not reference_scores:
        raise UserError("outliers needs at least one score and one reference score")
    if not 0 <= quantile <= 1:
        raise UserError(f"quantile must be between 0 and 1, got {quantile}")
    threshold = torch.tensor(reference_scores, dtype=torch.float64).quantile(quantile).item()
    count = sum(score > threshold for score in scores)
    return {"threshold": threshold, "count": count, "fraction": count / len(scores)}


def band_outliers(accuracies: list[float], low: float = 0.15, high: float = 0.60) -> dict:
    """How many forget sequences have a memorization accuracy g outside the band (low, high): g <= low or
    g >= high (Barbulescu and Triantafillou 2024, "To Each (Textual Sequence) Its Own").

    A good mean can hide sequences still recited (g high) and sequences pushed far below what unseen text
    gets (g low, over-unlearned, itself a membership signal); both ends count. Needs no holdout set.
    """
    if not accuracies:
        raise UserError("band outliers need at least one memorization accuracy")
    if not 0 <= low < high <= 1:
        raise UserError(f"the outlier band needs 0 <= low < high <= 1, got [{low}, {high}]")
    below = sum(g <= low for g in accuracies)
    above = sum(g >= high for g in accuracies)
    count = below + above
    return {"low": low, "high": high, "count": count, "fraction": count / len(accuracies), "below": below, "above": above}


def _check(sequences: list[list[int]], name: str, value: int, **others: int) -> None:
    """One-line UserError for a setting below 1 or a sequence not longer than `name`."""
    for key, setting in {name: value, **others}.items():
        if setting < 1:
            raise UserError(f"{key} must be at least 1, got {setting}")
    for index, seq in enumerate(sequences):
        if len(seq) <= value:
            raise UserError(f"sequence {index} has {len(seq)} tokens; {name}={value} needs more")


def _greedy(model, prefixes: list[list[int]], totals: list[int], batch_size: int, desc: str) -> list[list[int]]:
    """Each prefix extended by argmax decoding to its total length; returns only the new tokens.

    A loop of forward passes rather than `model.generate`, whose padding and stopping rules vary across
    models and configs. Rows are left-padded (masked, positions counted from each row's first real token)
    and decoded together with the model's key/value cache: one full forward over the prefixes, then one
    token per row per step; a row that reached its length decodes on and its extra tokens are dropped.
    Without the cache, EL_n's decodes were the suite's whole cost on a real model.
    """
    device = model_device(model)
    out = []
    for batch in batches(list(zip(prefixes, totals)), batch_size, desc):
        ids, mask = left_padded([prefix for prefix, _ in batch], 0)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache, new = None, []
        for _ in range(max(total - len(prefix) for prefix, total in batch)):
            step = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            cache, ids = step.cache, step.logits[:, -1:].argmax(-1)
            new.append(ids)
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            positions = positions[:, -1:] + 1
        tokens = torch.cat(new, 1).tolist() if new else [[] for _ in batch]
        out += [row[: total - len(prefix)] for row, (prefix, total) in zip(tokens, batch)]
    return out


def _ngram_overlap(generated: list[int], truth: list[int], n: int) -> float:
    """Fraction of the n-gram positions of `generated` whose n-gram occurs somewhere in `truth`."""
    truth_ngrams = set(_ngrams(truth, n))
    generated_ngrams = _ngrams(generated, n)
    return sum(ngram in truth_ngrams for ngram in generated_ngrams) / len(generated_ngrams)


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def _lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence, by the textbook dynamic program, one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]
