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

`load_suite` reads and checks every input once, before the first forward pass. A model's evaluation is
three steps, so that it runs in this process or split over the ranks of a group (ranks.py) with the same
numbers: `workload` cuts the parts whose inputs are given into items (tokenized, every random draw made),
`measure` measures a share of them per item, and `combine` turns every share's measurements into the
results; `evaluate_model` does all three on one model here. The forward passes go through inference.py. Every text goes
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
from engine.evaluation.inference import generate, inference, next_token_log_probs, pad_token_id, share
from engine.evaluation.judge import LLMJudge, familiarity_score, rule_grade
from engine.evaluation.memorization import band_outliers, extraction_likelihood, memorization_accuracy, outliers, verbatim_rouge
from engine.evaluation.privacy import Plan, ks_forget_quality, mia_auc, mia_scores, perturbation_plans, planned_perturbation_scores, privleak, roc_curve_points, zlib_scores

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
    if cfg.holdout_set and not cfg.forget_set:
        raise UserError("eval.holdout_set is compared with eval.forget_set: give both")
    if "relearn" in cfg.attacks and not cfg.forget_set:
        raise UserError("eval.attacks: relearn needs eval.forget_set (it fine-tunes on forget-set blocks the evaluation does not score)")
    judge = None
    if cfg.judge == "llm":
        judge = LLMJudge(cfg.judge_model, device or torch.device("cpu"), cfg.target_description, batch_size=cfg.batch_size)
    tasks = None
    if cfg.tasks:
        tasks = load_tasks(cfg.tasks, cfg.task_dirs)
    return Suite(
        probes=load_probes(cfg.probes) if cfg.probes else None,
        prompts=load_completion_prompts(cfg.completions) if cfg.completions else None,
        general_text=_read_text(cfg.general_text) if cfg.general_text else None,
        forget=read_corpus(cfg.forget_set) if cfg.forget_set else None,
        holdout=read_corpus(cfg.holdout_set) if cfg.holdout_set else None,
        tasks=tasks,
        judge=judge,
    )


@dataclass
class Workload:
    """One model's suite as lists of independent items, tokenized by its tokenizer and with every random draw
    made (perturbation plans; a sampled completion is seeded by its prompt's index), so that an item measures
    the same whoever measures it: this process, or the rank of a group whose `share` holds it. None skips a part."""

    pairs: list[tuple[int, str, list[int], list[int]]] | None  # probability familiarity: (probe index, target word, prompt ids, " word" ids)
    prompts: list[list[int]] | None  # completion familiarity
    windows: list[list[int]] | None  # perplexity
    forget: list[list[int]] | None  # memorization; membership with the holdout
    holdout: list[list[int]] | None
    forget_plans: list[list[Plan]] | None  # the perturbation attack's plans per sequence (membership, eval.perturbations)
    holdout_plans: list[list[Plan]] | None


def workload(tokenizer, cfg: EvalConfig, suite: Suite) -> Workload:
    """The suite's items for a model with this tokenizer (cheap: no model needed)."""
    forget, holdout = (sequences(tokenizer, texts, cfg) if texts else None for texts in (suite.forget, suite.holdout))
    plans = (None, None)
    if holdout and cfg.perturbations:
        plans = tuple(perturbation_plans(seqs, cfg.perturbations, cfg.perturb_fraction, cfg.perturb_span, cfg.seed) for seqs in (forget, holdout))
    return Workload(
        pairs=probe_pairs(tokenizer, suite.probes) if suite.probes else None,
        prompts=[tokenizer(p["prompt"])["input_ids"] for p in suite.prompts] if suite.prompts else None,
        windows=perplexity_windows(tokenizer, suite.general_text, cfg.context_length) if suite.general_text is not None else None,
        forget=forget,
        holdout=holdout,
        forget_plans=plans[0],
        holdout_plans=plans[1],
    )


def measure(model, tokenizer, work: Workload, cfg: EvalConfig, tasks: dict | None = None, rank: int = 0, world: int = 1) -> dict:
    """Per-item measurements of rank `rank`'s share of each part (all of it for one process), in item order,
    and with `tasks`, the lm-eval scores (every rank runs all of lm-eval; rank 0's are kept). `combine` turns
    the ranks' measurements, in rank order, into the suite's results."""
    def part(items: list) -> slice:
        return share(len(items), cfg.batch_size, rank, world)

    found: dict = {}
    if work.pairs is not None:
        found["pairs"] = target_probabilities(model, [pair[2:] for pair in work.pairs[part(work.pairs)]], cfg.batch_size)
    if work.prompts is not None:
        mine = part(work.prompts)
        found["completions"] = complete(model, tokenizer, work.prompts[mine], cfg, first=mine.start)
    if work.windows is not None:
        found["windows"] = window_losses(model, work.windows[part(work.windows)], cfg.batch_size)
    membership = work.holdout is not None
    for name, seqs, plans in (("forget", work.forget, work.forget_plans), ("holdout", work.holdout, work.holdout_plans)):
        if seqs is not None:
            mine = part(seqs)
            found[name] = measure_sequences(model, seqs[mine], plans[mine] if plans else None, cfg, recited=name == "forget", membership=membership)
    if tasks:
        scores = run_benchmarks(model, tokenizer, tasks, cfg.task_limit or None, cfg.batch_size)
        found["benchmarks"] = scores if rank == 0 else None
    return found


def combine(work: Workload, parts: list[dict], tokenizer, cfg: EvalConfig, suite: Suite, saga_terms: list[str]) -> dict:
    """The suite's results from every rank's `measure`, in rank order: flat scores plus a "details" dict.

    Scores: the paper's `METRICS` always (None when skipped, with details "skipped"); with a forget set,
    the `MEMORIZATION` means, `memorization_band_outliers` (the count outside `cfg.outlier_band`) and
    `memorized_outliers` (None without a holdout set); with a holdout set too, `mia_auc_loss`, `mia_auc_zlib`,
    `mia_auc_min_k` and, with `cfg.perturbations`, `mia_auc_perturbation`; per lm-eval task, `benchmark:TASK`
    (its accuracy). `compare_to_oracle` adds the oracle comparisons afterwards.
    """
    found = _joined(parts)
    details: dict = {name: "skipped" for name in METRICS}
    if work.pairs is not None:
        details["probability_familiarity"] = probe_familiarity(suite.probes, work.pairs, found["pairs"], tokenizer)
    if work.prompts is not None:
        details["completion_familiarity"] = graded_completions(suite.prompts, found["completions"], saga_terms, suite.judge)
    if work.windows is not None:
        details["perplexity"] = {"score": _perplexity_of(found["windows"]), "file": cfg.general_text}
    scores = {name: None if entry == "skipped" else entry["score"] for name, entry in details.items()}
    if work.forget is not None:
        forget, holdout = found["forget"], found.get("holdout")
        memorized = _memorization_of(forget, holdout, cfg)
        details["memorization"] = memorized
        scores.update({key: memorized[key]["mean"] for key in MEMORIZATION})
        scores["memorization_band_outliers"] = memorized["band_outliers"]["count"]
        scores["memorized_outliers"] = memorized["outliers"]["count"] if holdout else None
        if holdout:
            texts = {name: [tokenizer.decode(s, skip_special_tokens=True) for s in getattr(work, name)] for name in ("forget", "holdout")}
            details["membership"] = _membership_of(forget, holdout, texts)
            scores.update({f"mia_auc_{kind}": auc for kind, auc in details["membership"]["auc"].items()})
    if parts[0].get("benchmarks") is not None:
        details["benchmarks"] = parts[0]["benchmarks"]
        scores.update({f"benchmark:{task}": metrics.get("acc") for task, metrics in details["benchmarks"].items()})
    return {**scores, "details": details}


def _joined(parts: list[dict]) -> dict:
    """The ranks' per-item lists (flat, or by measure) concatenated in rank order: the items in their order
    (lm-eval's scores are whole on rank 0, not per item)."""
    joined: dict = {}
    for key, first in parts[0].items():
        if key == "benchmarks":
            continue
        if isinstance(first, dict):
            joined[key] = {measure: [value for part in parts for value in part[key][measure]] for measure in first}
        elif isinstance(first, list):
            joined[key] = [value for part in parts for value in part[key]]
    return joined


def evaluate_model(model, tokenizer, cfg: EvalConfig, saga_terms: list[str], suite: Suite | None = None) -> dict:
    """The suite's parts whose inputs are given, on one model in this process (`combine` says what comes
    back). `suite` defaults to `load_suite(cfg)`."""
    suite = suite or load_suite(cfg)
    work = workload(tokenizer, cfg, suite)
    return combine(work, [measure(model, tokenizer, work, cfg, suite.tasks)], tokenizer, cfg, suite, saga_terms)


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
    pairs = probe_pairs(tokenizer, probes)
    return probe_familiarity(probes, pairs, target_probabilities(model, [pair[2:] for pair in pairs], batch_size), tokenizer)


def probe_pairs(tokenizer, probes: list[dict]) -> list[tuple[int, str, list[int], list[int]]]:
    """(probe index, word, prompt ids, continuation ids) for each distinct target word of each probe."""
    return [(index, word, *_continuation_ids(tokenizer, probe["prompt"], word)) for index, probe in enumerate(probes) for word in dict.fromkeys(probe["targets"])]


def target_probabilities(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per (prompt ids, continuation ids): P(continuation | prompt), and the 5 likeliest next tokens after the
    prompt as (token id, probability)."""
    found = []
    with inference(model):
        rows = next_token_log_probs(model, [prompt_ids + cont_ids for prompt_ids, cont_ids in pairs], batch_size, "probability familiarity")
        for (prompt_ids, cont_ids), log_probs in zip(pairs, rows):
            first = len(prompt_ids) - 1  # the row predicting the first continuation token
            positions = torch.arange(first, first + len(cont_ids), device=log_probs.device)
            prob = log_probs[positions, torch.tensor(cont_ids, device=log_probs.device)].sum().exp().item()
            top = log_probs[first].exp().topk(5)
            found.append((prob, list(zip(top.indices.tolist(), top.values.tolist()))))
    return found


def probe_familiarity(probes: list[dict], pairs: list[tuple], probabilities: list[tuple[float, list]], tokenizer) -> dict:
    """`probability_familiarity` from the probabilities of the probes' `probe_pairs`."""
    per_probe = [{"prompt": probe["prompt"], "mass": 0.0, "targets": {}, "top": None} for probe in probes]
    for (index, word, _, _), (prob, top) in zip(pairs, probabilities):
        entry = per_probe[index]
        entry["targets"][word] = prob
        entry["mass"] = min(1.0, entry["mass"] + prob)
        if entry["top"] is None:
            entry["top"] = [(tokenizer.decode([token]), p) for token, p in top]
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
    completions = complete(model, tokenizer, [tokenizer(p["prompt"])["input_ids"] for p in prompts], cfg)
    return graded_completions(prompts, completions, saga_terms, judge)


def graded_completions(prompts: list[dict], completions: list[str], saga_terms: list[str], judge=None) -> dict:
    """`completion_familiarity` of the prompts' completions."""
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


def complete(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, first: int = 0) -> list[str]:
    """Continuations of the token-id prompts, at most `cfg.max_new_tokens` tokens: greedy in batches, or
    sampled (temperature, top-p) one prompt at a time, prompt i (`first` = the index of the first given)
    from seed `cfg.seed + i`, so a completion does not depend on which prompts share its batch or rank."""
    options = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": pad_token_id(tokenizer)}
    if not cfg.sample:
        return generate(model, tokenizer, prompts, cfg.batch_size, "completions", do_sample=False, **options)
    completions = []
    for index, prompt in enumerate(prompts, start=first):
        torch.manual_seed(cfg.seed + index)
        completions += generate(model, tokenizer, [prompt], 1, "completions", do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, **options)
    return completions


def perplexity(model, tokenizer, text: str, context_length: int = 128, batch_size: int = 8) -> float:
    """exp of the token-weighted mean next-token loss over non-overlapping windows of the tokenized text.

    Each window starts without context (its first token is not scored), like the training blocks; a last
    partial window counts if it has at least 2 tokens.
    """
    return _perplexity_of(window_losses(model, perplexity_windows(tokenizer, text, context_length), batch_size))


def perplexity_windows(tokenizer, text: str, context_length: int) -> list[list[int]]:
    """The windows `perplexity` scores; a one-line error when there are none."""
    ids = tokenizer(text)["input_ids"]
    windows = [ids[start : start + context_length] for start in range(0, len(ids), context_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise UserError("the perplexity text is too short: it needs at least 2 tokens")
    return windows


def window_losses(model, windows: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """Per window, (summed next-token loss, scored tokens)."""
    found = []
    with inference(model):
        for window, log_probs in zip(windows, next_token_log_probs(model, windows, batch_size, "perplexity")):
            targets = torch.tensor(window[1:], device=log_probs.device)
            found.append((-log_probs[:-1].gather(1, targets[:, None]).sum().item(), len(targets)))
    return found


def _perplexity_of(losses: list[tuple[float, int]]) -> float:
    return math.exp(sum(nll for nll, _ in losses) / sum(tokens for _, tokens in losses))


def sequences(tokenizer, documents: list[str], cfg: EvalConfig) -> list[list[int]]:
    """The first `max_sequences` blocks of `sequence_length` tokens, BOS first when the tokenizer adds one
    (as training saw the text)."""
    bos = [tokenizer.bos_token_id] if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else []
    blocks = make_blocks(documents, tokenizer, cfg.sequence_length - len(bos), name="evaluation set")
    return [bos + block.input_ids for block in blocks[: cfg.max_sequences]]


def measure_sequences(model, seqs: list[list[int]], plans: list[list[Plan]] | None, cfg: EvalConfig, recited: bool, membership: bool) -> dict[str, list[float]]:
    """Per sequence: memorization accuracy; with `recited` (the forget set) extraction likelihood and verbatim
    ROUGE-L; with `membership` the loss and Min-K% scores, and with `plans` the perturbation score."""
    measures = {"memorization_accuracy": lambda: memorization_accuracy(model, seqs, cfg.prefix_length, cfg.batch_size)}
    if recited:
        measures["extraction_likelihood"] = lambda: extraction_likelihood(model, seqs, cfg.el_n, cfg.batch_size, cfg.el_stride)
        measures["verbatim_rouge"] = lambda: verbatim_rouge(model, seqs, cfg.prefix_length, cfg.sequence_length - cfg.prefix_length, cfg.batch_size)
    found = {name: measured() if seqs else [] for name, measured in measures.items()}
    if membership:
        found.update(mia_scores(model, seqs, None, cfg.min_k, cfg.batch_size) if seqs else {"loss": [], "min_k": []})
    if plans is not None:
        found["perturbation"] = planned_perturbation_scores(model, seqs, plans, cfg.batch_size) if seqs else []
    return found


def _memorization_of(forget: dict[str, list[float]], holdout: dict[str, list[float]] | None, cfg: EvalConfig) -> dict:
    """Per-sequence memorization of the forget set, its outliers by band, and (with unseen text, whose
    accuracies set the threshold) its outliers by quantile."""
    result = {key: {"mean": sum(forget[key]) / len(forget[key]), "per_sequence": forget[key]} for key in MEMORIZATION}
    result["band_outliers"] = band_outliers(forget["memorization_accuracy"], *cfg.outlier_band)
    if holdout:
        unseen = holdout["memorization_accuracy"]
        result["outliers"] = {**outliers(forget["memorization_accuracy"], unseen), "holdout_per_sequence": unseen}
    else:
        result["outliers"] = {"count": None}
    return result


def _membership_of(forget: dict[str, list[float]], holdout: dict[str, list[float]], texts: dict[str, list[str]]) -> dict:
    """Membership inference forget vs holdout: ROC AUC per score (0.5 = the forget set looks unseen)."""
    scores = {}
    for name, found in (("forget", forget), ("holdout", holdout)):
        scores[name] = {"loss": found["loss"], "min_k": found["min_k"], "zlib": zlib_scores(found["loss"], texts[name])}
        if "perturbation" in found:
            scores[name]["perturbation"] = found["perturbation"]
    return {
        "auc": {kind: mia_auc(scores["forget"][kind], scores["holdout"][kind]) for kind in scores["forget"]},
        "roc_min_k": roc_curve_points(scores["forget"]["min_k"], scores["holdout"]["min_k"]),
        "forget": scores["forget"],
        "holdout": scores["holdout"],
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
