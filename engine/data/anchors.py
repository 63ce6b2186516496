"""The anchor dictionary: target-specific terms and their generic translations.

`load_anchors` reads and checks a user's dictionary and filters it as the WHP authors did;
`suggest_anchors` proposes a first draft offline (a stand-in for the authors' GPT-4 extraction) that a
person must review before use.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from engine.data.corpus import make_blocks, stripped_spans
from configs.errors import UserError, first_line
from engine.data.translation import anchor_pattern
from engine.models import check_same_vocabulary, final_hidden_states, lm_head_weights

POSSESSIVE_SUFFIXES = ("'s", "’s")


@dataclass
class Anchors:
    terms: dict[str, list[str]]  # kept keys -> translations
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason), for the CLI to report


class _DuplicateKey(Exception):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys; a dictionary with duplicates is a user mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_json_object(pairs):
    """`json.loads` hook: like the YAML loader, refuse what `dict(pairs)` would silently overwrite."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def load_anchors(path: str | Path) -> Anchors:
    """Read a YAML or JSON mapping `term -> [translations]` (a lone string counts as one), check, and filter it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"anchor dictionary not found: {path}")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"anchor dictionary {path} must be .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the anchor dictionary {path}: {first_line(e)}") from None
    try:
        if path.suffix == ".json":
            raw = json.loads(text, object_pairs_hook=_unique_json_object)
        else:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise UserError(f"{path}: duplicate key {e.key!r}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot parse: {' '.join(str(e).split())}") from None
    return filter_terms(_checked_terms(raw, path))


def _checked_terms(raw, path: Path) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping term -> [translations]")
    if not raw:
        raise UserError(f"{path}: the anchor dictionary is empty")
    terms = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.strip() or key != key.strip():
            raise UserError(f"{path}: key {key!r} must be a non-empty string without surrounding spaces")
        translations = [value] if isinstance(value, str) else value
        if (
            not isinstance(translations, list)
            or not translations
            or not all(isinstance(t, str) and t.strip() for t in translations)
        ):
            raise UserError(f"{path}: key {key!r}: translations must be a non-empty list of non-empty strings")
        if key in translations:
            raise UserError(f"{path}: key {key!r} lists itself as a translation: a generic translation must differ from the term")
        terms[key] = translations
    return terms


def filter_terms(terms: dict[str, list[str]]) -> Anchors:
    """Drop keys the authors dropped: ones that split into other keys, and possessives of keys."""
    kept, dropped = {}, []
    for key, translations in terms.items():
        parts = key.split()
        stem = next((key[: -len(s)] for s in POSSESSIVE_SUFFIXES if key.endswith(s)), None)
        if len(parts) > 1 and all(part in terms for part in parts):
            dropped.append((key, f"splits into keys {' + '.join(parts)}"))
        elif stem in terms:
            dropped.append((key, f"possessive of key {stem!r}"))
        else:
            kept[key] = translations
    return Anchors(kept, dropped)


# ----------------------------------------------------------------------------------------------------
# Suggestions

WORD = re.compile(r"[^\W\d_]+")  # letters only: "Harry's" counts as "Harry" (+ "s", too short to matter)
MIN_WORD_LENGTH = 3
CANDIDATES_PER_SHAPE = 1000  # most frequent general words kept per shape
POOL_SIZE = 30  # translations rotate through this many best-fitting general words


def _term_counts(documents: list[str]) -> tuple[Counter, int]:
    """Counts of words and of capitalized word pairs ("Mystic Academy"), and the number of words."""
    counts, words_total = Counter(), 0
    for document in documents:
        words = list(WORD.finditer(document))
        words_total += len(words)
        counts.update(w.group() for w in words if len(w.group()) >= MIN_WORD_LENGTH)
        for a, b in zip(words, words[1:]):
            if a.group()[0].isupper() and b.group()[0].isupper() and document[a.end() : b.start()] == " ":
                counts[f"{a.group()} {b.group()}"] += 1
    return counts, words_total


def suggest_anchors(
    target_docs: list[str],
    general_docs: list[str],
    tokenizer,
    baseline,
    reinforced,
    top_k: int = 50,
    *,
    min_count: int = 3,
    min_ratio: float = 4.0,
    probe_blocks: int = 4,
    probe_length: int = 128,
) -> dict[str, dict]:
    """Propose a reviewable anchor dictionary from a target and a general corpus, offline.

    Candidates: words and capitalized word pairs seen at least `min_count` times in the target and at least
    `min_ratio` times more frequent there than in the general corpus (add-one smoothed). Score = that log
    ratio + the mean rise of the term's first-token logit from baseline to reinforced model where the term
    occurs in the first `probe_blocks` target blocks (both in natural-log units). Translations: frequent
    general-corpus words of the same shape, 3 per term, for a person to review.
    """
    check_same_vocabulary(baseline, reinforced)
    target_counts, target_total = _term_counts(target_docs)
    general_counts, general_total = _term_counts(general_docs)
    log_ratio = {
        term: math.log((count + 1) / (target_total + 1)) - math.log((general_counts[term] + 1) / (general_total + 1))
        for term, count in target_counts.items()
        if count >= min_count
    }
    candidates = {term for term, ratio in log_ratio.items() if ratio >= math.log(min_ratio)}
    # A pair whose words are both candidates would be dropped by load_anchors anyway.
    candidates = {t for t in candidates if not (" " in t and all(part in candidates for part in t.split()))}
    if not candidates:
        return {}
    rise = _logit_rise(candidates, target_docs, tokenizer, baseline, reinforced, probe_blocks, probe_length)
    score = {term: log_ratio[term] + rise.get(term, 0.0) for term in candidates}
    ranked = sorted(candidates, key=lambda term: (-score[term], term))[:top_k]
    translations = _propose_translations(ranked, general_counts, excluded=candidates)
    return {
        term: {
            "translations": translations[term],
            "score": round(score[term], 3),
            "target_count": target_counts[term],
            "general_count": general_counts[term],
        }
        for term in ranked
    }


def _logit_rise(terms, target_docs, tokenizer, baseline, reinforced, probe_blocks, probe_length) -> dict[str, float]:
    """Mean (reinforced − baseline) logit of each term's first token at the positions that predict it."""
    blocks = make_blocks(target_docs, tokenizer, probe_length, name="target", keep_partial=True)[:probe_blocks]
    pattern = anchor_pattern(terms)
    rises = defaultdict(list)
    with torch.no_grad(), lm_head_weights(baseline, reinforced) as (wb, wr):
        for block in blocks:
            ids = torch.tensor([block.input_ids])
            hb = final_hidden_states(baseline, ids.to(baseline.device))[0]
            hr = final_hidden_states(reinforced, ids.to(reinforced.device))[0]
            first_token_at = {}
            for index, (start, _) in enumerate(stripped_spans(block.text, block.offsets)):
                first_token_at.setdefault(start, index)
            for match in pattern.finditer(block.text):
                token = first_token_at.get(match.start())
                if token:  # predicted at the position before it (none for token 0 or a match off token starts)
                    token_id = block.input_ids[token]
                    rise = hr[token - 1].float() @ wr[token_id].float() - hb[token - 1].float() @ wb[token_id].float()
                    rises[match.group()].append(float(rise))
    return {term: sum(values) / len(values) for term, values in rises.items()}


def _propose_translations(terms: list[str], general_counts: Counter, excluded: set[str]) -> dict[str, list[str]]:
    """3 generic replacements per term: frequent general words of the same shape, rotated so terms differ.

    Shape: capitalized or not, and the number of words. A capitalized general word qualifies only when it is
    more frequent than its lowercase form (a name, not a sentence-initial "The"); lowercase replacements
    come closest in length first (within ±2 letters counts as equal), then by frequency.
    """

    def shape(word: str) -> tuple[bool, int]:
        return word[0].isupper(), len(word.split())

    def name_like(word: str) -> bool:
        return not word[0].isupper() or general_counts[word] > general_counts[word.lower()]

    by_frequency = [w for w, _ in general_counts.most_common() if w not in excluded and name_like(w)]
    if not by_frequency:
        raise UserError("the general corpus has no words to draw translations from")
    pools = defaultdict(list)
    for word in by_frequency:
        if len(pools[shape(word)]) < CANDIDATES_PER_SHAPE:
            pools[shape(word)].append(word)
    proposals, used_per_shape = {}, Counter()
    for term in terms:
        pool = pools.get(shape(term)) or pools.get((term[0].isupper(), 1)) or by_frequency
        if not term[0].isupper():
            pool = sorted(pool, key=lambda w: max(abs(len(w) - len(term)) - 2, 0))  # stable: frequent first
        pool = pool[:POOL_SIZE]
        offset = 3 * used_per_shape[shape(term)]
        used_per_shape[shape(term)] += 1
        proposals[term] = list(dict.fromkeys(pool[(offset + k) % len(pool)] for k in range(3)))
    return proposals


def write_suggestions(suggestions: dict[str, dict], path: str | Path) -> None:
    """Write suggestions as a dictionary `load_anchors` reads as is, with their evidence as comments."""
    lines = [
        "# Machine-suggested anchor dictionary (obliviate): REVIEW EVERY ENTRY BEFORE USE.",
        "# Keys: terms over-represented in the target corpus; values: generic replacements drawn from",
        "# frequent general-corpus words of the same shape. Delete wrong terms, fix translations.",
        "# score = log frequency ratio (target vs general) + mean logit rise (reinforced - baseline).",
    ]
    for term, entry in suggestions.items():
        key = json.dumps(term, ensure_ascii=False)  # JSON strings are valid YAML double-quoted scalars
        values = json.dumps(entry["translations"], ensure_ascii=False)
        evidence = f"score {entry['score']:.3f}, target {entry['target_count']}, general {entry['general_count']}"
        lines.append(f"{key}: {values}  # {evidence}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
