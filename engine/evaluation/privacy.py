"""Privacy and oracle-closeness of an unlearned model: membership inference on the forget set, compared with the
oracle (a model trained without the forget set), as in MUSE (Shi et al. 2024) and TOFU (Maini et al. 2024).

Sign convention, for every score here: higher = more likely unseen (a non-member). `mia_auc` labels the
holdout set (never trained on) 1 and the forget set 0, so it is P(holdout score > forget score): 1.0 = the forget
set is recognisable as seen (memorised), 0.5 = indistinguishable from unseen text. An oracle scores near 0.5,
not exactly: forget and holdout texts differ in content too.

The perturbation attack (`perturbation_scores`) is the one of Barbulescu and Triantafillou 2024, "To Each
(Textual Sequence) Its Own", with the evaluated model itself refilling the perturbed spans instead of T5.
"""

from __future__ import annotations

import math
import zlib

import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score, roc_curve

from configs.errors import UserError
from engine.evaluation.inference import batches, inference, model_device, next_token_log_probs

Plan = tuple[list[int], list[float]]  # the positions one perturbed copy resamples, a uniform draw for each


def mia_scores(
    model, sequences: list[list[int]], texts: list[str] | None = None, k: float = 0.2, batch_size: int = 8
) -> dict[str, list[float]]:
    """Per-sequence membership scores, in order, from the log-probabilities of tokens 2..n given their prefix.

    - "loss": mean next-token NLL (LOSS attack, Yeom et al. 2018).
    - "zlib": that mean NLL (log-perplexity, not the NLL sum) over the zlib-compressed byte length of the text,
      as in Carlini et al. 2021 and MUSE's code; only when `texts` (the decoded sequences) is given.
    - "min_k": minus the mean of the k fraction lowest token log-probabilities, at least one token
      (Min-K% Prob, Shi et al. 2024; negated like MUSE's code so that higher = unseen, as above).
    """
    _check_sequences(sequences)
    if texts is not None and len(texts) != len(sequences):
        raise UserError(f"membership scores: {len(texts)} texts for {len(sequences)} sequences")
    if not 0 < k <= 1:
        raise UserError(f"membership scores: k must be in (0, 1], got {k}")
    scores: dict[str, list[float]] = {"loss": [], "min_k": []}
    with inference(model):
        for seq, log_probs in zip(sequences, next_token_log_probs(model, sequences, batch_size, "membership")):
            token_log_probs = _token_log_probs(seq, log_probs)
            scores["loss"].append(-token_log_probs.mean().item())
            lowest = token_log_probs.topk(max(1, int(k * len(token_log_probs))), largest=False).values
            scores["min_k"].append(-lowest.mean().item())
    if texts is not None:
        scores["zlib"] = zlib_scores(scores["loss"], texts)
    return scores


def zlib_scores(losses: list[float], texts: list[str]) -> list[float]:
    """The "zlib" score of `mia_scores` from each sequence's loss and decoded text."""
    return [loss / len(zlib.compress(text.encode("utf-8"))) for loss, text in zip(losses, texts)]


def perturbation_scores(
    model, sequences: list[list[int]], copies: int = 4, fraction: float = 0.15, span: int = 2, seed: int = 0, batch_size: int = 8
) -> list[float]:
    """Per sequence x, minus |LL(x) - mean_k LL(x~_k)| over `copies` perturbed copies x~_k, LL being the mean
    log-likelihood of tokens 2..n (Barbulescu and Triantafillou 2024, after DetectGPT, Mitchell et al. 2023).

    Text the model was trained on sits at a peak of its likelihood, so perturbing it moves LL far: the paper
    counts a large discrepancy as member; it is negated here so that higher = unseen, like every score here.
    The paper refills masked spans with T5; the suite runs offline with no second model, so `perturb` refills
    them from the evaluated model's own next-token distribution, which also keeps the copies on the
    distribution of text the model reads. Spans are drawn from `seed` (`perturbation_plans`).
    """
    return planned_perturbation_scores(model, sequences, perturbation_plans(sequences, copies, fraction, span, seed), batch_size)


def perturbation_plans(sequences: list[list[int]], copies: int, fraction: float, span: int, seed: int) -> list[list[Plan]]:
    """Per sequence, the plans of its `copies` perturbed copies, all drawn in order from `seed`: drawn once
    for the whole set, they travel with their sequences, so a sequence is perturbed alike whoever scores it."""
    _check_sequences(sequences)
    if copies < 1 or span < 1 or not 0 < fraction <= 1:
        raise UserError(f"perturbation scores need copies >= 1, span >= 1 and fraction in (0, 1], got {copies}, {span}, {fraction}")
    generator = torch.Generator().manual_seed(seed)
    return [[perturbation_plan(len(seq), fraction, span, generator) for _ in range(copies)] for seq in sequences]


def planned_perturbation_scores(model, sequences: list[list[int]], plans: list[list[Plan]], batch_size: int = 8) -> list[float]:
    """`perturbation_scores` with each sequence's copies perturbed by its own plans (`perturbation_plans`)."""
    copies = len(plans[0]) if plans else 0
    perturbed = perturb(model, [seq for seq in sequences for _ in range(copies)], [plan for own in plans for plan in own], batch_size)
    own, theirs = _mean_log_likelihoods(model, sequences, batch_size), _mean_log_likelihoods(model, perturbed, batch_size)
    return [-abs(ll - sum(theirs[i * copies : (i + 1) * copies]) / copies) for i, ll in enumerate(own)]


def perturbation_plan(length: int, fraction: float, span: int, generator: torch.Generator) -> Plan:
    """The positions one copy of a `length`-token sequence resamples, and a uniform draw per position.

    Positions 1.. are cut into spans of `span` (the first token, BOS, is never touched); round(fraction ·
    (length - 1) / span) spans, at least one, are picked at random. Everything random is drawn here, up front
    on the CPU, so the copies depend on the seed only, not on batching or device.
    """
    starts = list(range(1, length, span))
    count = min(len(starts), max(1, round(fraction * (length - 1) / span)))
    chosen = sorted(starts[i] for i in torch.randperm(len(starts), generator=generator)[:count].tolist())
    positions = [p for start in chosen for p in range(start, min(start + span, length))]
    return positions, torch.rand(len(positions), generator=generator, dtype=torch.float64).tolist()


def perturb(model, sequences: list[list[int]], plans: list[Plan], batch_size: int = 8) -> list[list[int]]:
    """Each sequence with its plan's positions resampled left to right, same length, every other token kept.

    Position p gets a token drawn from the model's next-token distribution given the already perturbed
    tokens before it, with the original token excluded: a mask-filling model does not see it either, and a
    model that memorised the text would otherwise mostly draw it back and leave just the text it knows best
    unperturbed. Draws are by inverse CDF at the plan's uniforms. A batch is read once, left to right, with
    the model's key/value cache: the tokens up to the next position any row resamples are fed, the rows that
    resample there draw from the last fed position's logits (the only ones kept), and feeding resumes from
    the drawn tokens. Right padding is exact unmasked, because a causal position never sees the tokens after
    it. (A forward of the whole prefix per resampled position, with full logits, made this attack the
    suite's slowest part on a real model.)
    """
    device = model_device(model)
    out = []
    with inference(model):
        for batch in batches(list(zip(sequences, plans)), batch_size, "perturbation"):
            ids = torch.zeros(len(batch), max(len(seq) for seq, _ in batch), dtype=torch.long)
            draws: dict[int, list[tuple[int, float]]] = {}  # position -> the rows resampling it, with their uniforms
            for row, (seq, (positions, uniforms)) in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                for position, uniform in zip(positions, uniforms):
                    draws.setdefault(position, []).append((row, uniform))
            cache, fed = None, 0
            for at in sorted(draws):
                step = model(input_ids=ids[:, fed:at].to(device), cache=cache, use_cache=True, logits_to_keep=1)
                cache, fed = step.cache, at
                rows = [row for row, _ in draws[at]]
                uniforms = torch.tensor([uniform for _, uniform in draws[at]], dtype=torch.float64)
                probs = step.logits[rows, -1].double().softmax(-1).cpu()
                ids[rows, at] = _draw(probs, ids[rows, at], uniforms)
            out += [ids[row, : len(seq)].tolist() for row, (seq, _) in enumerate(batch)]
    return out


def _draw(probs: torch.Tensor, originals: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token at its uniform on the inverse CDF of `probs` without the row's original token
    (uniform over the other tokens where they have no mass at all)."""
    weights = probs.scatter(1, originals[:, None], 0.0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights).scatter(1, originals[:, None], 0.0))
    cumulative = weights.cumsum(1)
    picks = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True).squeeze(1)
    return torch.minimum(picks, (weights > 0).cumsum(1).argmax(1))  # a draw rounded onto the total: the last token with mass


def _mean_log_likelihoods(model, sequences: list[list[int]], batch_size: int) -> list[float]:
    """Per sequence, the mean log-likelihood of tokens 2..n: minus the LOSS score."""
    with inference(model):
        rows = next_token_log_probs(model, sequences, batch_size, "perturbation likelihoods")
        return [_token_log_probs(seq, log_probs).mean().item() for seq, log_probs in zip(sequences, rows)]


def _check_sequences(sequences: list[list[int]]) -> None:
    """One-line UserError for no sequences or one with nothing to score."""
    if not sequences:
        raise UserError("membership scores: no sequences to score")
    short = [index for index, seq in enumerate(sequences) if len(seq) < 2]
    if short:
        raise UserError(f"membership scores: sequence {short[0]} has fewer than 2 tokens, nothing to score")


def _token_log_probs(seq: list[int], log_probs: torch.Tensor) -> torch.Tensor:
    """The log-probabilities of tokens 2..n of `seq` from its next-token log-probabilities."""
    targets = torch.tensor(seq[1:], device=log_probs.device)
    return log_probs[:-1].gather(1, targets[:, None]).squeeze(1)


def _labelled(forget_scores: list[float], holdout_scores: list[float]) -> tuple[list[int], list[float]]:
    """Labels (holdout 1, forget 0) and scores side by side; both sets are needed for a ROC."""
    if not forget_scores or not holdout_scores:
        raise UserError(
            f"membership AUC needs forget and holdout scores, got {len(forget_scores)} and {len(holdout_scores)}"
        )
    return [0] * len(forget_scores) + [1] * len(holdout_scores), [*forget_scores, *holdout_scores]


def mia_auc(forget_scores: list[float], holdout_scores: list[float]) -> float:
    """ROC AUC of telling holdout (unseen) from forget by the score: 0.5 = indistinguishable, 1.0 = memorised."""
    return float(roc_auc_score(*_labelled(forget_scores, holdout_scores)))


def roc_curve_points(forget_scores: list[float], holdout_scores: list[float]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) of the ROC behind `mia_auc`, for the report's plot."""
    fpr, tpr, _ = roc_curve(*_labelled(forget_scores, holdout_scores))
    return fpr.tolist(), tpr.tolist()


def privleak(auc_unlearned: float, auc_oracle: float) -> float:
    """MUSE's PrivLeak (Shi et al. 2024), as a fraction (MUSE prints it x100 as a percentage).

    MUSE defines (A_unlearn - A_retrain) / A_retrain, where its AUC is oriented the other way round from
    `mia_auc`: A = 1 - `mia_auc` (as open-unlearning's port notes). So here it is
    (auc_oracle - auc_unlearned) / (1 - auc_oracle), both AUCs from `mia_auc`. 0 = leaks as much as the oracle
    (the goal); negative = under-unlearning, the forget set still looks seen (a model that never unlearned gets
    about -1: MUSE's target model scores -99.8% on News); positive = over-unlearning, the forget set looks less
    familiar than unseen text, itself a membership signal. nan when the oracle AUC is 1 (division by 0).
    """
    if 1.0 - auc_oracle < 1e-12:
        return math.nan
    return (auc_oracle - auc_unlearned) / (1.0 - auc_oracle)


def ks_forget_quality(unlearned_losses: list[float], oracle_losses: list[float]) -> dict:
    """TOFU's forget quality (Maini et al. 2024): two-sample Kolmogorov-Smirnov test between the unlearned and
    the oracle model's per-sequence statistics on the forget set (TOFU uses truth ratios; here, losses).

    A high p-value means the two distributions cannot be told apart: the unlearned model behaves like the oracle.
    """
    if not unlearned_losses or not oracle_losses:
        raise UserError(
            f"forget quality needs losses of both models, got {len(unlearned_losses)} and {len(oracle_losses)}"
        )
    result = ks_2samp(unlearned_losses, oracle_losses)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue)}
