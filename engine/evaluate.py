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
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from configs.schema import EvalConfig
from engine.errors import UserError

METRICS = ("probability_familiarity", "completion_familiarity", "perplexity")


def load_probes(path: str | Path) -> list[dict]:
    """Probes for probability familiarity: `[{"prompt": str, "targets": [word, ...]}]`."""
    return _load_items(path, "targets", allow_empty=False)


def load_completion_prompts(path: str | Path) -> list[dict]:
    """Prompts for completion familiarity: `[{"prompt": str, "references": [term, ...], "subtlety"?}]`."""
    return _load_items(path, "references", allow_empty=True)


def _load_items(path: str | Path, words_field: str, allow_empty: bool) -> list[dict]:
    """Read a JSON list of `{prompt, <words_field>: [str]}`; fail with one line naming file, index, field."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"evaluation file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty JSON list")
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


def judge_completion(prompt: str, completion: str, terms: list[str]) -> tuple[int, list[str]]:
    """Rule judge: grade 3 if the completion names a term (whole word, case-sensitive) the prompt did not.

    A stand-in for the paper's GPT-4 judge, which also gives 2 for typical themes and 1 for accidental
    hints; there is no theme detector yet, so the grade is 3 or 0. Returns (grade, revealed terms).
    """
    revealed = []
    for term in dict.fromkeys(t for t in terms if t.strip()):
        pattern = re.compile(rf"(?<!\w){re.escape(term)}(?!\w)")
        if pattern.search(completion) and not pattern.search(prompt):
            revealed.append(term)
    return (3 if revealed else 0), revealed


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    raise UserError("the tokenizer has no pad, eos or unk token to pad generation batches with")


def completion_familiarity(
    model, tokenizer, prompts: list[dict], saga_terms: list[str], max_new_tokens: int = 24, batch_size: int = 8
) -> dict:
    """Greedy completions graded by `judge_completion` against the prompt's references plus the saga terms.

    Score = (5·#grade 3 + #grade 2) / #valid as in the paper: 0 to 5, not a probability, so it is not on
    the scale of probability familiarity. Greedy decoding makes it deterministic for a given model.
    """
    pad_id = _pad_token_id(tokenizer)
    device = _device(model)
    encoded = [tokenizer(p["prompt"])["input_ids"] for p in prompts]
    completions = []
    with _inference(model):
        for batch in _batches(encoded, batch_size, "completion familiarity"):
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, seq in enumerate(batch):  # left padding: generation continues right after each prompt
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            completions += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    grades = {0: 0, 1: 0, 2: 0, 3: 0}
    samples = []
    for prompt, completion in zip(prompts, completions):
        grade, revealed = judge_completion(prompt["prompt"], completion, prompt["references"] + list(saga_terms))
        grades[grade] += 1
        samples.append({"prompt": prompt["prompt"], "completion": completion, "grade": grade, "revealed": revealed})
    score = (5 * grades[3] + grades[2]) / len(samples)
    return {"score": score, "grades": grades, "samples": samples}


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


def evaluate_model(model, tokenizer, cfg: EvalConfig, saga_terms: list[str]) -> dict:
    """The three metrics for one model; a metric whose file is "" is None with details "skipped".

    All inputs are read and checked before the first forward pass, so a bad file fails fast.
    """
    probes = load_probes(cfg.probes) if cfg.probes else None
    prompts = load_completion_prompts(cfg.completions) if cfg.completions else None
    text = _read_text(cfg.general_text) if cfg.general_text else None
    details: dict = {name: "skipped" for name in METRICS}
    if probes:
        details["probability_familiarity"] = probability_familiarity(model, tokenizer, probes, cfg.batch_size)
    if prompts:
        details["completion_familiarity"] = completion_familiarity(
            model, tokenizer, prompts, saga_terms, cfg.max_new_tokens, cfg.batch_size
        )
    if text is not None:
        ppl = perplexity(model, tokenizer, text, cfg.context_length, cfg.batch_size)
        details["perplexity"] = {"score": ppl, "file": cfg.general_text}
    scores = {name: None if found == "skipped" else found["score"] for name, found in details.items()}
    return {**scores, "details": details}


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"evaluation file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not readable as UTF-8 text ({e})") from None
