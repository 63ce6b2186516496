"""Demo-level evaluation of forgetting (whp-algorithm.md, "Evaluation in the paper").

Three numbers per model: probability familiarity (mass on target-specific next words), completion
familiarity (do greedy completions reveal target terms?) and perplexity on general text (did the model
stay a language model?). The full benchmark suite (lm-eval) is separate; these functions are meant to be
reused by it and by the trainer.

Every text goes through `tokenizer(text)` with its default special tokens, exactly as training does, so
the evaluation sees the model's inputs in the same form it was trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from configs.schema import EvalConfig
from configs.errors import UserError

METRICS = ("probability_familiarity", "completion_familiarity", "perplexity")  # the paper's, always reported


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


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, then the model's previous mode back (it may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(items: list, batch_size: int, desc: str) -> Iterator[list]:
    """Consecutive slices of `items`, with a progress bar on interactive terminals."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=None):
        yield items[start : start + batch_size]


def _next_token_log_probs(model, sequences: list[list[int]], batch_size: int, desc: str) -> Iterator[torch.Tensor]:
    """Per sequence, in order: fp32 log-probabilities of the next token at each position, `[len, vocab]`.

    Sequences are right-padded: a causal model's real positions never see the padding after them.
    """
    device = _device(model)
    for batch in _batches(sequences, batch_size, desc):
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        log_probs = logits.float().log_softmax(-1)
        for row, seq in enumerate(batch):
            yield log_probs[row, : len(seq)]


def _continuation_ids(tokenizer, prompt: str, word: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of " word" following it, as the tokenizer splits the joined text."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + " " + word)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids) :]
    return prompt_ids, tokenizer(" " + word, add_special_tokens=False)["input_ids"]


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
    with _inference(model):
        sequences = [prompt_ids + cont_ids for _, _, prompt_ids, cont_ids in pairs]
        rows = _next_token_log_probs(model, sequences, batch_size, "probability familiarity")
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


def left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) [len(batch), longest], padded on the left so generation continues right
    after each sequence."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    raise UserError("the tokenizer has no pad, eos or unk token to pad generation batches with")


def completion_familiarity(model, tokenizer, prompts: list[dict], saga_terms: list[str], cfg: EvalConfig, judge=None) -> dict:
    """Completions (greedy, or sampled with a seed) graded 0–3 by the LLM judge when given, else the rule
    judge; score = (5·#3 + #2) / #valid as in the paper: 0 to 5, not a probability. Unparseable judge
    answers are counted as invalid and reported."""
    from engine.evaluation.judge import familiarity_score, rule_grade

    completions = generate(model, tokenizer, [p["prompt"] for p in prompts], cfg)
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


def generate(model, tokenizer, prompts: list[str], cfg: EvalConfig) -> list[str]:
    """Continuations of the prompts, left-padded in batches; greedy, or sampled from `cfg.seed`."""
    pad_id = pad_token_id(tokenizer)
    device = _device(model)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.sample else {"do_sample": False}
    completions = []
    with _inference(model):
        torch.manual_seed(cfg.seed)
        for batch in _batches(encoded, cfg.batch_size, "completions"):
            ids, mask = left_padded(batch, pad_id)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, **sampling
            )
            completions += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return completions


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
    with _inference(model):
        rows = _next_token_log_probs(model, windows, batch_size, "perplexity")
        for window, log_probs in zip(windows, rows):
            targets = torch.tensor(window[1:], device=log_probs.device)
            total_nll -= log_probs[:-1].gather(1, targets[:, None]).sum().item()
            total_tokens += len(targets)
    return math.exp(total_nll / total_tokens)


def evaluate_model(model, tokenizer, cfg: EvalConfig, saga_terms: list[str], suite: Suite | None = None) -> dict:
    """Every metric of the suite for one model; a part whose input is "" is None with details "skipped".

    All inputs are read and checked before the first forward pass (`load_suite`), so a bad file fails fast.
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
        scores["memorized_outliers"] = memorized["outliers"]["count"] if holdout else None
        if holdout:
            details["membership"] = membership(model, tokenizer, forget, holdout, cfg)
            scores.update({f"mia_auc_{kind}": auc for kind, auc in details["membership"]["auc"].items()})
    if suite.tasks:
        from engine.evaluation.benchmarks import run_benchmarks

        benchmarks = run_benchmarks(model, tokenizer, suite.tasks, cfg.task_limit or None, cfg.batch_size)
        details["benchmarks"] = benchmarks
        scores.update({f"benchmark:{task}": metrics.get("acc") for task, metrics in benchmarks.items()})
    return {**scores, "details": details}


MEMORIZATION = ("memorization_accuracy", "extraction_likelihood", "verbatim_rouge")


@dataclass
class Suite:
    """The suite's inputs, read and checked once for all models."""

    probes: list[dict] | None
    prompts: list[dict] | None
    general_text: str | None
    forget: list[str] | None  # documents
    holdout: list[str] | None
    tasks: dict | None  # lm-eval task objects by name
    judge: object | None  # an LLM judge; None: the rule judge


def load_suite(cfg: EvalConfig, device: torch.device | None = None) -> Suite:
    from engine.data.corpus import read_corpus

    judge = None
    if cfg.judge == "llm":
        from engine.evaluation.judge import LLMJudge

        judge = LLMJudge(cfg.judge_model, device or torch.device("cpu"), cfg.target_description, batch_size=cfg.batch_size)
    tasks = None
    if cfg.tasks:
        from engine.evaluation.benchmarks import load_tasks

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


def sequences(tokenizer, documents: list[str], cfg: EvalConfig) -> list[list[int]]:
    """The first `max_sequences` blocks of `sequence_length` tokens, BOS first when the tokenizer adds one
    (as training saw the text)."""
    from engine.data.corpus import make_blocks

    bos = [tokenizer.bos_token_id] if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else []
    blocks = make_blocks(documents, tokenizer, cfg.sequence_length - len(bos), name="evaluation set")
    return [bos + block.input_ids for block in blocks[: cfg.max_sequences]]


def memorization(model, forget: list[list[int]], holdout: list[list[int]] | None, cfg: EvalConfig) -> dict:
    """Per-sequence memorization of the forget set (and of unseen text, the threshold for outliers)."""
    from engine.evaluation.memorization import extraction_likelihood, memorization_accuracy, outliers, verbatim_rouge

    def measure(seqs: list[list[int]]) -> dict[str, list[float]]:
        return {
            "memorization_accuracy": memorization_accuracy(model, seqs, cfg.prefix_length, cfg.batch_size),
            "extraction_likelihood": extraction_likelihood(model, seqs, cfg.el_n, cfg.batch_size, cfg.el_stride),
            "verbatim_rouge": verbatim_rouge(model, seqs, cfg.prefix_length, cfg.sequence_length - cfg.prefix_length, cfg.batch_size),
        }

    found = measure(forget)
    result = {key: {"mean": sum(values) / len(values), "per_sequence": values} for key, values in found.items()}
    if holdout:
        unseen = memorization_accuracy(model, holdout, cfg.prefix_length, cfg.batch_size)
        result["outliers"] = {**outliers(found["memorization_accuracy"], unseen), "holdout_per_sequence": unseen}
    else:
        result["outliers"] = {"count": None}
    return result


def membership(model, tokenizer, forget: list[list[int]], holdout: list[list[int]], cfg: EvalConfig) -> dict:
    """Membership inference forget vs holdout: ROC AUC per score (0.5 = the forget set looks unseen)."""
    from engine.evaluation.privacy import mia_auc, mia_scores, roc_curve_points

    def scores(seqs):
        return mia_scores(model, seqs, [tokenizer.decode(s, skip_special_tokens=True) for s in seqs], cfg.min_k, cfg.batch_size)

    forget_scores, holdout_scores = scores(forget), scores(holdout)
    return {
        "auc": {kind: mia_auc(forget_scores[kind], holdout_scores[kind]) for kind in forget_scores},
        "roc_min_k": roc_curve_points(forget_scores["min_k"], holdout_scores["min_k"]),
        "forget": forget_scores,
        "holdout": holdout_scores,
    }


def compare_to_oracle(results: dict[str, dict]) -> None:
    """With an oracle among the models: MUSE's PrivLeak (Min-K% AUC) and the KS test of forget-set losses
    (TOFU's forget quality) for every other model, added to its results."""
    from engine.evaluation.privacy import ks_forget_quality, privleak

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


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"evaluation file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable as UTF-8 text ({e})") from None
