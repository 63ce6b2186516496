"""The evaluation suite: how much of the target an unlearned model still knows, recites and leaks, and what
it cost the model, measured the same way on every model of a run (baseline, unlearned, oracle).

- Familiarity, the two measures of "Who's Harry Potter?" (Eldan and Russinovich 2023): by probability
  (`probability_familiarity`, the mass the model puts on target-specific next words after each probe)
  and by completion (`completion_familiarity`, completions of prompts graded 0-3 by a judge, judge.py).
- Perplexity on general text (`perplexity`): did the model stay a language model?
- Memorization of the forget set (memorization.py): memorization accuracy, extraction likelihood,
  verbatim ROUGE-L, the forget sequences whose accuracy lies outside an acceptable band, and those
  memorized beyond what the model does on unseen holdout text.
- Membership inference, forget set vs holdout (privacy.py): ROC AUC of the loss, zlib, Min-K% and
  perturbation scores.
- Closeness to the oracle (`compare_to_oracle`, with an oracle among the models): PrivLeak and the KS
  forget quality of each other model.
- General benchmarks through lm-eval (benchmarks.py).

`load_suite` reads and checks every input once, before the first forward pass; `evaluate_model` runs the
parts whose inputs are given on one model. The forward passes go through inference.py. Every text goes
through `tokenizer(text)` with its default special tokens, exactly as training does, so the evaluation
sees the model's inputs in the same form it was trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.errors import UserError
from configs.schema import EvalConfig
from engine.data.corpus import make_blocks, read_corpus
from engine.evaluation.benchmarks import load_tasks, run_benchmarks
from engine.evaluation.inference import generate, inference, next_token_log_probs, pad_token_id
from engine.evaluation.judge import LLMJudge, familiarity_score, rule_grade
from engine.evaluation.memorization import band_outliers, extraction_likelihood, memorization_accuracy, outliers, verbatim_rouge
from engine.evaluation.privacy import ks_forget_quality, mia_auc, mia_scores, perturbation_scores, privleak, roc_curve_points

METRICS = ("probability_familiarity", "completion_familiarity", "perplexity")  # the paper's: always in the results, None when skipped
MEMORIZATION = ("memorization_accuracy", "extraction_likelihood", "verbatim_rouge")  # means over the forget set


@dataclass
class Suite:
    """The suite's inputs, read and checked once (`load_suite`) for all the models of a run; None skips a part."""

    probes: list[dict] | None  # probability familiarity
    prompts: list[dict] | None  # completion familiarity
    general_text: str | None  # perplexity
    forget: list[str] | None  # documents: memorization, and membership with the holdout
    holdout: list[str] | None  # documents never trained on
    tasks: dict | None  # lm-eval task objects by name
    judge: LLMJudge | None  # the completion judge; None: the rule judge


def load_suite(cfg: EvalConfig, device: torch.device | None = None) -> Suite:
    """Every input of the suite that `cfg` names ("" or [] skips a part), read and checked, so that a bad
    file, an unknown lm-eval task or an unusable judge fails with one line before the first forward pass.
    The LLM judge's weights load later, at its first grading, onto `device` (default the CPU)."""
    judge = None
    if cfg.judge == "llm":
        judge = LLMJudge(cfg.judge_model, device or torch.device("cpu"), cfg.target_description, batch_size=cfg.batch_size)
    tasks = None
    if cfg.tasks:
        tasks = load_tasks(cfg.tasks, cfg.task_dirs)
    if cfg.holdout_set and not cfg.forget_set:
        raise UserError("eval.holdout_set is compared with eval.forget_set: give both")
    return Suite(
        probes=load_probes(cfg.probes) if cfg.probes else None,
        prompts=load_completion_prompts(cfg.completions) if cfg.completions else None,
        general_text=_read_text(cfg.general_text) if cfg.general_text else None,
        forget=read_corpus(cfg.forget_set) if cfg.forget_set else None,
        holdout=read_corpus(cfg.holdout_set) if cfg.holdout_set else None,
        tasks=tasks,
        judge=judge,
    )


def evaluate_model(model, tokenizer, cfg: EvalConfig, saga_terms: list[str], suite: Suite | None = None) -> dict:
    """The suite's parts whose inputs are given, on one model: flat scores plus a "details" dict.

    Scores: the paper's `METRICS` always (None when skipped, with details "skipped"); with a forget set,
    the `MEMORIZATION` means, `memorization_band_outliers` (the count outside `cfg.outlier_band`) and
    `memorized_outliers` (None without a holdout set); with a holdout set too, `mia_auc_loss`, `mia_auc_zlib`,
    `mia_auc_min_k` and, with `cfg.perturbations`, `mia_auc_perturbation`; per lm-eval task, `benchmark:TASK`
    (its accuracy).
    `suite` defaults to `load_suite(cfg)`; `compare_to_oracle` adds the oracle comparisons afterwards.
    """
    suite = suite or load_suite(cfg)
    details: dict = {name: "skipped" for name in METRICS}
    if suite.probes:
        details["probability_familiarity"] = probability_familiarity(model, tokenizer, suite.probes, cfg.batch_size)
    if suite.prompts:
        details["completion_familiarity"] = completion_familiarity(model, tokenizer, suite.prompts, saga_terms, cfg, suite.judge)
    if suite.general_text is not None:
        ppl = perplexity(model, tokenizer, suite.general_text, cfg.context_length, cfg.batch_size)
        details["perplexity"] = {"score": ppl, "file": cfg.general_text}
    scores = {name: None if found == "skipped" else found["score"] for name, found in details.items()}
    if suite.forget is not None:
        forget, holdout = (sequences(tokenizer, texts, cfg) if texts else None for texts in (suite.forget, suite.holdout))
        memorized = memorization(model, forget, holdout, cfg)
        details["memorization"] = memorized
        scores.update({key: memorized[key]["mean"] for key in MEMORIZATION})
        scores["memorization_band_outliers"] = memorized["band_outliers"]["count"]
        scores["memorized_outliers"] = memorized["outliers"]["count"] if holdout else None
        if holdout:
            details["membership"] = membership(model, tokenizer, forget, holdout, cfg)
            scores.update({f"mia_auc_{kind}": auc for kind, auc in details["membership"]["auc"].items()})
    if suite.tasks:
        benchmarks = run_benchmarks(model, tokenizer, suite.tasks, cfg.task_limit or None, cfg.batch_size)
        details["benchmarks"] = benchmarks
        scores.update({f"benchmark:{task}": metrics.get("acc") for task, metrics in benchmarks.items()})
    return {**scores, "details": details}


def compare_to_oracle(results: dict[str, dict]) -> None:
    """With an oracle among the models: MUSE's PrivLeak (Min-K% AUC) and the KS test of forget-set losses
    (TOFU's forget quality) for every other model, added to its results."""
    oracle = results.get("oracle", {}).get("details", {}).get("membership")
    if not oracle:
        return
    for name, result in results.items():
        mine = result.get("details", {}).get("membership")
        if name == "oracle" or not mine:
            continue
        result["privleak"] = privleak(mine["auc"]["min_k"], oracle["auc"]["min_k"])
        quality = ks_forget_quality(mine["forget"]["loss"], oracle["forget"]["loss"])
        result["forget_quality"] = quality["p_value"]
        result["details"]["oracle_closeness"] = quality


def probability_familiarity(model, tokenizer, probes: list[dict], batch_size: int = 8) -> dict:
    """Mean over probes of the probability that the prompt continues with one of its target words.

    Per target, P(" word" | prompt) is the chain-rule product over the word's tokens, so multi-token
    names count fully. Masses of a probe's distinct targets are summed and capped at 1 (a target that is
    a prefix of another, "magic"/"magical", is counted twice). A non-empty list of probes is expected.
    """
    pairs = []  # (probe index, word, prompt ids, continuation ids)
    for index, probe in enumerate(probes):
        for word in dict.fromkeys(probe["targets"]):
            pairs.append((index, word, *_continuation_ids(tokenizer, probe["prompt"], word)))
    per_probe = [{"prompt": probe["prompt"], "mass": 0.0, "targets": {}, "top": None} for probe in probes]
    with inference(model):
        sequences = [prompt_ids + cont_ids for _, _, prompt_ids, cont_ids in pairs]
        rows = next_token_log_probs(model, sequences, batch_size, "probability familiarity")
        for (index, word, prompt_ids, cont_ids), log_probs in zip(pairs, rows):
            first = len(prompt_ids) - 1  # the row predicting the first continuation token
            positions = torch.arange(first, first + len(cont_ids), device=log_probs.device)
            tokens = torch.tensor(cont_ids, device=log_probs.device)
            prob = log_probs[positions, tokens].sum().exp().item()
            entry = per_probe[index]
            entry["targets"][word] = prob
            entry["mass"] = min(1.0, entry["mass"] + prob)
            if entry["top"] is None:
                top = log_probs[first].exp().topk(5)
                entry["top"] = [(tokenizer.decode([t]), p) for t, p in zip(top.indices.tolist(), top.values.tolist())]
    score = sum(entry["mass"] for entry in per_probe) / len(per_probe)
    return {"score": score, "per_probe": per_probe}


def _continuation_ids(tokenizer, prompt: str, word: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of " word" following it, as the tokenizer splits the joined text."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + " " + word)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids) :]
    return prompt_ids, tokenizer(" " + word, add_special_tokens=False)["input_ids"]


def completion_familiarity(model, tokenizer, prompts: list[dict], saga_terms: list[str], cfg: EvalConfig, judge=None) -> dict:
    """Completions (greedy, or sampled with a seed) graded 0–3 by the LLM judge when given, else the rule
    judge; score = (5·#3 + #2) / #valid as in the paper: 0 to 5, not a probability. Unparseable judge
    answers are counted as invalid and reported."""
    completions = complete(model, tokenizer, [p["prompt"] for p in prompts], cfg)
    samples = []
    if judge is not None:
        graded = judge.grade([(p["prompt"], completion, p["references"]) for p, completion in zip(prompts, completions)])
        for p, completion, (grade, answer) in zip(prompts, completions, graded):
            samples.append({"prompt": p["prompt"], "completion": completion, "grade": grade, "revealed": [], "judge_answer": answer})
    else:
        for p, completion in zip(prompts, completions):
            grade, revealed = rule_grade(p["prompt"], completion, p["references"], saga_terms)
            samples.append({"prompt": p["prompt"], "completion": completion, "grade": grade, "revealed": revealed})
    score = familiarity_score([sample["grade"] for sample in samples])
    return {**score, "judge": "llm" if judge is not None else "rule", "samples": samples}


def complete(model, tokenizer, prompts: list[str], cfg: EvalConfig) -> list[str]:
    """Continuations of the prompts, at most `cfg.max_new_tokens` tokens: greedy, or sampled (temperature,
    top-p) from `cfg.seed`."""
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.sample else {"do_sample": False}
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    torch.manual_seed(cfg.seed)
    options = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": pad_token_id(tokenizer), **sampling}
    return generate(model, tokenizer, encoded, cfg.batch_size, "completions", **options)


def perplexity(model, tokenizer, text: str, context_length: int = 128, batch_size: int = 8) -> float:
    """exp of the token-weighted mean next-token loss over non-overlapping windows of the tokenized text.

    Each window starts without context (its first token is not scored), like the training blocks; a last
    partial window counts if it has at least 2 tokens.
    """
    ids = tokenizer(text)["input_ids"]
    windows = [ids[start : start + context_length] for start in range(0, len(ids), context_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise UserError("the perplexity text is too short: it needs at least 2 tokens")
    total_nll, total_tokens = 0.0, 0
    with inference(model):
        rows = next_token_log_probs(model, windows, batch_size, "perplexity")
        for window, log_probs in zip(windows, rows):
            targets = torch.tensor(window[1:], device=log_probs.device)
            total_nll -= log_probs[:-1].gather(1, targets[:, None]).sum().item()
            total_tokens += len(targets)
    return math.exp(total_nll / total_tokens)


def sequences(tokenizer, documents: list[str], cfg: EvalConfig) -> list[list[int]]:
    """The first `max_sequences` blocks of `sequence_length` tokens, BOS first when the tokenizer adds one
    (as training saw the text)."""
    bos = [tokenizer.bos_token_id] if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else []
    blocks = make_blocks(documents, tokenizer, cfg.sequence_length - len(bos), name="evaluation set")
    return [bos + block.input_ids for block in blocks[: cfg.max_sequences]]


def memorization(model, forget: list[list[int]], holdout: list[list[int]] | None, cfg: EvalConfig) -> dict:
    """Per-sequence memorization of the forget set, its outliers by band, and (with unseen text, whose
    accuracies set the threshold) its outliers by quantile."""

    def measure(seqs: list[list[int]]) -> dict[str, list[float]]:
        return {
            "memorization_accuracy": memorization_accuracy(model, seqs, cfg.prefix_length, cfg.batch_size),
            "extraction_likelihood": extraction_likelihood(model, seqs, cfg.el_n, cfg.batch_size, cfg.el_stride),
            "verbatim_rouge": verbatim_rouge(model, seqs, cfg.prefix_length, cfg.sequence_length - cfg.prefix_length, cfg.batch_size),
        }

    found = measure(forget)
    result = {key: {"mean": sum(values) / len(values), "per_sequence": values} for key, values in found.items()}
    result["band_outliers"] = band_outliers(found["memorization_accuracy"], *cfg.outlier_band)
    if holdout:
        unseen = memorization_accuracy(model, holdout, cfg.prefix_length, cfg.batch_size)
        result["outliers"] = {**outliers(found["memorization_accuracy"], unseen), "holdout_per_sequence": unseen}
    else:
        result["outliers"] = {"count": None}
    return result


def membership(model, tokenizer, forget: list[list[int]], holdout: list[list[int]], cfg: EvalConfig) -> dict:
    """Membership inference forget vs holdout: ROC AUC per score (0.5 = the forget set looks unseen)."""

    def scores(seqs):
        found = mia_scores(model, seqs, [tokenizer.decode(s, skip_special_tokens=True) for s in seqs], cfg.min_k, cfg.batch_size)
        if cfg.perturbations:
            found["perturbation"] = perturbation_scores(model, seqs, cfg.perturbations, cfg.perturb_fraction, cfg.perturb_span, cfg.seed, cfg.batch_size)
        return found

    forget_scores, holdout_scores = scores(forget), scores(holdout)
    return {
        "auc": {kind: mia_auc(forget_scores[kind], holdout_scores[kind]) for kind in forget_scores},
        "roc_min_k": roc_curve_points(forget_scores["min_k"], holdout_scores["min_k"]),
        "forget": forget_scores,
        "holdout": holdout_scores,
    }


def load_probes(path: str | Path) -> list[dict]:
    """Probes for probability familiarity: `[{"prompt": str, "targets": [word, ...]}]` (JSON, or JSONL by suffix)."""
    return _load_items(path, "targets", allow_empty=False)


def load_completion_prompts(path: str | Path) -> list[dict]:
    """Prompts for completion familiarity: `[{"prompt": str, "references": [term, ...], "subtlety"?}]`."""
    return _load_items(path, "references", allow_empty=True)


def _load_items(path: str | Path, words_field: str, allow_empty: bool) -> list[dict]:
    """Read a JSON list of `{prompt, <words_field>: [str]}`; fail with one line naming file, index, field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        items = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except FileNotFoundError:
        raise UserError(f"evaluation file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty JSON list (or JSONL records)")
    for index, item in enumerate(items):
        where = f"{path}: item {index}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected an object")
        for field in ("prompt", words_field):
            if field not in item:
                raise UserError(f"{where}: missing field {field!r}")
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string")
        words = item[words_field]
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise UserError(f"{where}: {words_field!r} must be a list of non-empty strings")
        if not words and not allow_empty:
            raise UserError(f"{where}: {words_field!r} must not be empty")
    return items


def _read_text(path: str | Path) -> str:
    """The whole file as text (the general text for perplexity); a one-line error if missing or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"evaluation file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable as UTF-8 text ({e})") from None
