"""Anchor translation of one block and the map from its original positions to the translated ones.

The baseline reads the translated block, the reinforced model the original one; the position map pairs
each original position with the translated position whose next-token prediction corresponds to it, and
the forbidden rows name the tokens a translated anchor must not leak back through (docs/algorithm.md).
"""

from __future__ import annotations

import bisect
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from engine.data.corpus import Block, stripped_spans


@dataclass
class Translation:
    """One block after anchor translation; `position_map[i]` is a translated position or -1 (ignored)."""

    input_ids: list[int]
    translated_ids: list[int]
    position_map: list[int]
    forbidden: list[list[int]]  # per translated position: token ids whose baseline logit becomes the row mean
    skipped: int  # anchor matches left untranslated because they do not fall on token boundaries
    unaligned: int  # positions ignored because the translated tokenization has no counterpart
    matched: int  # anchor matches translated
    translated_text: str


@dataclass
class _Replacement:
    key: str
    text: str  # the chosen translation
    first_token: int  # original token positions covered by the anchor
    last_token: int
    start: int  # characters of the replacement in the translated text
    end: int


def anchor_pattern(keys: Iterable[str]) -> re.Pattern:
    """Case-sensitive whole-word matcher of the keys; longest key first, so `finditer` is greedy longest-match."""
    return _compiled_pattern(tuple(sorted(set(keys), key=lambda key: (-len(key), key))))


@lru_cache(maxsize=8)
def _compiled_pattern(keys: tuple[str, ...]) -> re.Pattern:
    # \b would fail for keys that begin or end with punctuation ("Dr."); lookarounds mean "not inside a word".
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, keys)) + r")(?!\w)")


def translate_block(
    block: Block,
    anchors: dict[str, list[str]],
    tokenizer,
    rng: random.Random,
    forbid_anchor_keys: bool = False,
) -> Translation:
    """Translate the block's anchors and build the position map and forbidden tokens (see module doc)."""
    chosen = {key: rng.choice(anchors[key]) for key in sorted(anchors)}  # drawn for every key: order-stable
    spans = stripped_spans(block.text, block.offsets)
    first_token_at, last_token_at = {}, {}
    for index, (start, end) in enumerate(spans):
        first_token_at.setdefault(start, index)
        last_token_at[end] = index

    # Scan, skip matches off token boundaries, and build the translated text.
    pieces, cursor, shift = [], 0, 0
    replacements: list[_Replacement] = []
    original_ends, shifts_after = [], [0]  # shifts_after[k]: character shift once k replacements are behind
    occurring_keys, skipped = set(), 0
    for match in anchor_pattern(anchors).finditer(block.text) if anchors else ():
        key = match.group()
        occurring_keys.add(key)
        first, last = first_token_at.get(match.start()), last_token_at.get(match.end())
        if first is None or last is None:
            skipped += 1
            continue
        replacement = chosen[key]
        start = match.start() + shift
        pieces += [block.text[cursor : match.start()], replacement]
        replacements.append(_Replacement(key, replacement, first, last, start, start + len(replacement)))
        shift += len(replacement) - len(key)
        original_ends.append(match.end())
        shifts_after.append(shift)
        cursor = match.end()
    pieces.append(block.text[cursor:])
    translated_text = "".join(pieces)

    encoding = tokenizer(translated_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    translated_ids = list(encoding["input_ids"])
    translated_spans = stripped_spans(translated_text, encoding["offset_mapping"])
    translated_at = defaultdict(list)  # span -> translated positions (several for byte-fallback pieces)
    for index, span in enumerate(translated_spans):
        translated_at[span].append(index)
    translated_last_at = {end: index for index, (_, end) in enumerate(translated_spans)}

    # Rule-ignored positions first; everything else is looked up and counted when it has no counterpart.
    position_map = [-1] * len(block.input_ids)
    ignored, anchor_last = _ignored_positions(replacements)
    unaligned, same_span_seen = 0, defaultdict(int)
    for index, (start, end) in enumerate(spans):
        if index in ignored:
            continue
        if index in anchor_last:
            target = translated_last_at.get(anchor_last[index].end, -1)
        else:
            delta = shifts_after[bisect.bisect_right(original_ends, start)]
            candidates = translated_at.get((start + delta, end + delta), [])
            ordinal = same_span_seen[(start, end)]
            same_span_seen[(start, end)] += 1
            target = candidates[ordinal] if ordinal < len(candidates) else -1
        position_map[index] = target
        unaligned += target < 0

    forbidden = _forbidden_rows(
        tokenizer, translated_ids, translated_spans, replacements, occurring_keys if forbid_anchor_keys else ()
    )
    return Translation(
        input_ids=list(block.input_ids),
        translated_ids=translated_ids,
        position_map=position_map,
        forbidden=forbidden,
        skipped=skipped,
        unaligned=unaligned,
        matched=len(replacements),
        translated_text=translated_text,
    )


def _ignored_positions(replacements: list[_Replacement]) -> tuple[set[int], dict[int, _Replacement]]:
    """Original positions inside a translated anchor (and just before a repeated one) are not trained; an
    anchor's last token maps to the translation's last token."""
    ignored, anchor_last, seen_keys = set(), {}, set()
    for replacement in replacements:
        ignored.update(range(replacement.first_token, replacement.last_token))
        anchor_last[replacement.last_token] = replacement
        if replacement.key in seen_keys and replacement.first_token > 0:
            ignored.add(replacement.first_token - 1)
        seen_keys.add(replacement.key)
    return ignored, anchor_last


def _forbidden_rows(tokenizer, translated_ids, translated_spans, replacements, always_forbidden_keys):
    """Per translated row, the ids forbidden there: a replacement's first token from the row after it on."""
    new_from_row = defaultdict(set)
    translated_ends = [end for _, end in translated_spans]
    for replacement in replacements:
        start_token = bisect.bisect_right(translated_ends, replacement.start)  # token covering its first character
        ids = _first_word_tokens(tokenizer, replacement.text)
        if start_token < len(translated_ids) and not _is_whitespace(tokenizer, translated_ids[start_token]):
            ids.add(translated_ids[start_token])
        new_from_row[start_token + 1] |= ids
    current = set().union(*(_first_word_tokens(tokenizer, key) for key in always_forbidden_keys))
    rows = []
    for row in range(len(translated_ids)):
        current |= new_from_row.get(row, set())
        rows.append(sorted(current))
    return rows


def _first_word_tokens(tokenizer, word: str) -> set[int]:
    """First token of `word` tokenized with and without a leading space, skipping pure-whitespace tokens."""
    firsts = set()
    for text in (word, " " + word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = next((i for i in ids if not _is_whitespace(tokenizer, i)), None)
        if first is not None:
            firsts.add(first)
    return firsts


def _is_whitespace(tokenizer, token_id: int) -> bool:
    return not tokenizer.decode([token_id]).strip()
