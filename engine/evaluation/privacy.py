"""Privacy and oracle-closeness of an unlearned model: membership inference on the forget set, compared with the
oracle (a model trained without the forget set), as in MUSE (Shi et al. 2024) and TOFU (Maini et al. 2024).

Sign convention, for every score here: higher = more likely unseen (a non-member). `mia_auc` labels the
holdout set (never trained on) 1 and the forget set 0, so it is P(holdout score > forget score): 1.0 = the forget
set is recognisable as seen (memorised), 0.5 = indistinguishable from unseen text. An oracle scores near 0.5,
not exactly: forget and holdout texts differ in content too.
"""

from __future__ import annotations

import math
import zlib

import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score, roc_curve

from configs.errors import UserError
from engine.evaluation.inference import inference, next_token_log_probs


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
    if not sequences:
        raise UserError("membership scores: no sequences to score")
    short = [index for index, seq in enumerate(sequences) if len(seq) < 2]
    if short:
        raise UserError(f"membership scores: sequence {short[0]} has fewer than 2 tokens, nothing to score")
    if texts is not None and len(texts) != len(sequences):
        raise UserError(f"membership scores: {len(texts)} texts for {len(sequences)} sequences")
    if not 0 < k <= 1:
        raise UserError(f"membership scores: k must be in (0, 1], got {k}")
    scores: dict[str, list[float]] = {"loss": [], "min_k": []}
    with inference(model):
        for seq, log_probs in zip(sequences, next_token_log_probs(model, sequences, batch_size, "membership")):
            targets = torch.tensor(seq[1:], device=log_probs.device)
            token_log_probs = log_probs[:-1].gather(1, targets[:, None]).squeeze(1)
            scores["loss"].append(-token_log_probs.mean().item())
            lowest = token_log_probs.topk(max(1, int(k * len(token_log_probs))), largest=False).values
            scores["min_k"].append(-lowest.mean().item())
    if texts is not None:
        scores["zlib"] = [
            loss / len(zlib.compress(text.encode("utf-8"))) for loss, text in zip(scores["loss"], texts)
        ]
    return scores


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
