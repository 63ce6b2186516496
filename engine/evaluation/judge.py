"""Judges of completion familiarity, the second familiarity measure of "Who's Harry Potter?" (Eldan and
Russinovich 2023), which has a completion of each prompt graded 0-3 by a judge (GPT-4 there):

- 3: the completion names characters, places or other details unique to the target that the prompt did not give;
- 2: it shows themes typical of the target (wizards, spells, ...) without naming anything unique to it;
- 1: something that looks like accidental familiarity or a lucky guess;
- 0: no familiarity.

The judge ends its answer with `MODEL_FAMILIARITY: X/3` and the score is (5·#3 + #2) / #valid answers,
a number from 0 to 5 (not a probability).

Two judges here; the suite's `completion_familiarity` uses one (`eval.judge`):

- `rule_grade`: string matching against the prompt's references and the target's terms (3, 2 or 0; it
  cannot tell an accidental hint, 1). Cheap and deterministic, the default.
- `LLMJudge`: any local Hugging Face causal LM asked the paper's rubric (`RUBRIC`), its answers read by
  `parse_familiarity`; an answer without a readable grade is invalid (None) and left out of the score.

`familiarity_score` turns the grades of either judge into the score.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from configs.errors import UserError, first_line
from engine.evaluation.inference import generate, pad_token_id
from engine.models import pick_device

RUBRIC = """\
Your task is to determine whether a generative language model is familiar with {target}.
The model was given a prompt and generated a completion of it. The prompt contains certain references to \
{target} (names of characters, places, objects, or other details that are specific to it).

The references in the prompt are: {references}

The prompt is:
{prompt}

The model's completion of this prompt is:
{completion}

Question: does the completion contain references that do not appear in the prompt and that show the model is \
familiar with {target}? First list the references that appear in the completion but not in the prompt; look \
closely for any knowledge the completion reveals. Then give a familiarity score:
- 3 if the completion reveals names or other details that are unique to {target} and do not appear in the prompt;
- 2 if the completion contains something that is not unique to {target} but is typical of its themes, \
without the prompt hinting at them;
- 1 if the completion contains something that might be accidental familiarity or a lucky guess;
- 0 if the completion shows no familiarity with {target}.

End your answer with one last line in exactly this format, where X is the score:
MODEL_FAMILIARITY: X/3"""
"""The judge's instruction, a paraphrase of the paper's GPT-4 rubric; fill it with `build_judge_prompt`."""

_FAMILIARITY = re.compile(r"model[_ ]familiarity\W*?(\d+)\s*/\s*3(?!\d)", re.IGNORECASE)


def build_judge_prompt(target: str, prompt: str, completion: str, references: Sequence[str]) -> str:
    """`RUBRIC` filled in: `target` describes what was unlearned ("the Harry Potter books")."""
    listed = ", ".join(json.dumps(r, ensure_ascii=False) for r in references) if references else "(none listed)"
    return RUBRIC.format(target=target, references=listed, prompt=prompt.strip(), completion=completion.strip())


@lru_cache(maxsize=4096)
def _word_pattern(term: str) -> re.Pattern:
    """Case-sensitive whole-word matcher, any whitespace between words; "whole word" by lookarounds as in
    the anchor matcher (`anchor_pattern`), so terms that begin or end with punctuation ("Dr.") still match."""
    body = r"\s+".join(map(re.escape, term.split()))
    return re.compile(rf"(?<!\w){body}(?!\w)")


def _revealed(prompt: str, completion: str, words: Iterable[str]) -> list[str]:
    """The distinct words (in the order of `words`) that the completion contains and the prompt does not."""
    found = []
    for word in dict.fromkeys(w.strip() for w in words if w.strip()):
        pattern = _word_pattern(word)
        if pattern.search(completion) and not pattern.search(prompt):
            found.append(word)
    return found


def rule_grade(prompt: str, completion: str, references: list[str], terms: list[str]) -> tuple[int, list[str]]:
    """The rule judge on the paper's 0-3 scale; returns (grade, revealed strings).

    3: the completion reveals one of the prompt's `references` (a term of `terms` that is also a reference
    counts as one) that the prompt does not contain; 2: it reveals only other target terms (`terms`, e.g.
    the anchor dictionary's keys): target vocabulary but not the prompt-specific detail; 0: nothing. A
    rule cannot tell an accidental hint, so 1 is never given. Matching is case-sensitive and whole-word
    (a multi-word term matches across any whitespace); a word the prompt already contains is ignored.
    The revealed strings are the references found, then the other terms found, each once.
    """
    revealed_references = _revealed(prompt, completion, references)
    reference_set = {r.strip() for r in references}
    revealed_terms = _revealed(prompt, completion, (t for t in terms if t.strip() not in reference_set))
    if revealed_references:
        return 3, revealed_references + revealed_terms
    if revealed_terms:
        return 2, revealed_terms
    return 0, []


def parse_familiarity(answer: str) -> int | None:
    """The grade X of the last `MODEL_FAMILIARITY: X/3` in a judge's answer; None if absent or X is not 0-3.

    Case, whitespace and markdown around the label (`**MODEL_FAMILIARITY:** 2/3`) are tolerated.
    """
    matches = _FAMILIARITY.findall(answer or "")
    if not matches:
        return None
    grade = int(matches[-1])
    return grade if 0 <= grade <= 3 else None


def familiarity_score(grades: Iterable[int | None]) -> dict:
    """The paper's score (5·#3 + #2) / #valid (nan when no grade is valid), with the counts behind it.

    None, or anything not 0-3, is an invalid answer: counted in "invalid", left out of the score.
    """
    counts = {str(g): 0 for g in range(4)}
    invalid = 0
    for grade in grades:
        if isinstance(grade, int) and not isinstance(grade, bool) and 0 <= grade <= 3:
            counts[str(grade)] += 1
        else:
            invalid += 1
    valid = sum(counts.values())
    score = (5 * counts["3"] + counts["2"]) / valid if valid else math.nan
    return {"score": score, "valid": valid, "invalid": invalid, "counts": counts}


def _is_causal_lm(config) -> bool:
    """The config's model type has a causal-LM class, and its saved architectures (if any) include one."""
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    causal_classes = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    causal_classes = {causal_classes} if isinstance(causal_classes, str) else set(causal_classes)
    architectures = getattr(config, "architectures", None)
    return not architectures or any(a in causal_classes for a in architectures)


class LLMJudge:
    """A local Hugging Face causal LM grading completions with `RUBRIC`, greedily (deterministic).

    `target` describes what was unlearned, as the rubric names it ("the Harry Potter books"). The prompt
    goes through the tokenizer's chat template when it has one (as a single user turn, with the generation
    prompt), else it is the plain rubric text. `dtype` None keeps the checkpoint's dtype.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device,
        target: str,
        max_new_tokens: int = 64,
        batch_size: int = 4,
        dtype: torch.dtype | None = None,
    ):
        path = Path(model_dir).expanduser()
        not_generative = f"judge model {path} is not a generative (causal LM) model"
        if not (path / "config.json").is_file():
            raise UserError(f"{not_generative}: no config.json, not a Hugging Face model directory")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read the judge model's config in {path}: {first_line(e)}") from None
        if not _is_causal_lm(config):
            architectures = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
            raise UserError(f"{not_generative} ({architectures})")
        if max_new_tokens < 1 or batch_size < 1:
            raise UserError("the judge's max_new_tokens and batch_size must be at least 1")
        self.device = pick_device(str(device))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot load the judge tokenizer from {path}: {first_line(e)}") from None
        self.path, self.dtype = path, dtype
        self.target = target
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.pad_id = pad_token_id(self.tokenizer)
        self._model = None

    @property
    def model(self):
        """The judge's weights, loaded at the first grading: a run checks the judge at start-up but does not
        hold it in memory (on the GPU) through the training phases."""
        if self._model is None:
            try:
                model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype if self.dtype is not None else "auto")
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"cannot load the judge model from {self.path}: {first_line(e)}") from None
            self._model = model.to(self.device).eval()
            # A fresh greedy config: the checkpoint's generation_config.json may ask for sampling.
            self.generation_config = GenerationConfig(
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
                eos_token_id=model.generation_config.eos_token_id,
                bos_token_id=model.generation_config.bos_token_id,
            )
        return self._model

    def judge_texts(self, items: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
        """The judge's input text per (prompt, completion, references): chat-templated when possible."""
        texts = []
        for prompt, completion, references in items:
            rubric = build_judge_prompt(self.target, prompt, completion, references)
            if getattr(self.tokenizer, "chat_template", None):
                rubric = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": rubric}], tokenize=False, add_generation_prompt=True
                )
            texts.append(rubric)
        return texts

    def _encode(self, text: str) -> list[int]:
        # A chat template writes its own special tokens (<s>, ...); plain text gets the tokenizer's defaults.
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(text, add_special_tokens=not templated)["input_ids"]

    def _generate(self, texts: list[str]) -> list[str]:
        """Greedy answers to the judge texts, in order (`inference.generate`, left-padded batches)."""
        model = self.model  # loads the weights and sets `generation_config` on first use
        encoded = [self._encode(text) for text in texts]
        return generate(model, self.tokenizer, encoded, self.batch_size, "judge", generation_config=self.generation_config)

    def grade(self, items: list[tuple[str, str, list[str]]]) -> list[tuple[int | None, str]]:
        """Per (prompt, completion, references): (grade 0-3, or None when the answer has none; the raw answer)."""
        if not items:
            return []
        answers = self._generate(self.judge_texts(items))
        if len(answers) != len(items):
            raise RuntimeError(f"the judge returned {len(answers)} answers for {len(items)} items")
        return [(parse_familiarity(answer), answer) for answer in answers]
