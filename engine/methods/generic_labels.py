"""Generic labels, faithful to ../shared/design/whp-algorithm.md ("Generic labels, per block").

Per block: translate the anchors (one seeded translation per key), map every original position to the
translated position whose next-token prediction corresponds to it, run the baseline on the translated
tokens and the reinforced model on the original ones, and let `kernels.generic_labels` mix and pick the
labels. The translated block is run as it comes out of the tokenizer, so it may be a few tokens longer
or shorter than `context_length`; the baseline must accept that length (its `max_position_embeddings`
should leave some headroom over the block length; `stats["max_translated_length"]` reports the longest).
"""

from __future__ import annotations

import bisect
import json
import random
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import datasets
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import kernels
from kernels.device import nvtx_range
from configs.schema import LabelConfig
from engine.data.corpus import Block, stripped_spans
from configs.errors import UserError

IGNORE_INDEX = -100
META_FILE = "labelset.json"


# ----------------------------------------------------------------------------------------------------
# Translation and position map


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
    ignored, anchor_last = set(), {}
    seen_keys = set()
    for replacement in replacements:
        ignored.update(range(replacement.first_token, replacement.last_token))
        anchor_last[replacement.last_token] = replacement
        if replacement.key in seen_keys and replacement.first_token > 0:
            ignored.add(replacement.first_token - 1)
        seen_keys.add(replacement.key)

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


# ----------------------------------------------------------------------------------------------------
# Forward passes, mixing, label sets


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head inputs (after the final norm): the kernel applies the head itself, so logits never materialize here."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def head_weight(model) -> torch.nn.Parameter:
    """The LM-head weight parameter (under ZeRO-3 a shard: read it inside `lm_head_weights`)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError("the model's LM head has a bias; generic labels support bias-free (Llama-class) heads only")
    return head.weight


@contextmanager
def lm_head_weights(*models) -> Iterator[list[torch.Tensor]]:
    """The full LM-head weights of `models` for the duration of the block.

    The kernel applies the heads itself, outside their modules' forward, so under DeepSpeed ZeRO-3 the
    partitioned weights must be gathered explicitly (as trl's `maybe_gather_lm_head_ctx` does); every
    rank must enter this together. Unsharded models pass through untouched.
    """
    weights = [head_weight(model) for model in models]
    partitioned = [w for w in weights if hasattr(w, "ds_id")]
    if not partitioned:
        yield weights
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield weights


@torch.no_grad()
def check_head_gives_logits(model, input_ids: torch.Tensor, role: str) -> None:
    """Mixing applies the head to the final hidden states itself: refuse models that change logits afterwards.

    (Gemma-2's soft-capping or Cohere's logit scale would make the labels silently wrong.) The full
    forward runs outside `lm_head_weights`: under ZeRO-3 the head's own forward re-partitions its weight.
    """
    logits = model(input_ids=input_ids).logits.float()
    hidden = final_hidden_states(model, input_ids).float()
    with lm_head_weights(model) as (weight,):
        recomputed = hidden @ weight.float().T
    if not torch.allclose(logits, recomputed, rtol=1e-3, atol=1e-3 * float(logits.abs().max()) + 1e-4):
        raise UserError(f"the {role} model transforms its logits after the LM head (e.g. soft-capping); generic labels need plain head(hidden) logits")


def check_same_vocabulary(baseline, reinforced) -> None:
    """Labels index one vocabulary: both models must share it (a reinforced model of another base would not)."""
    shapes = [tuple(getattr(w, "ds_shape", w.shape)) for w in (head_weight(baseline), head_weight(reinforced))]
    sizes = [model.config.vocab_size for model in (baseline, reinforced)]
    if shapes[0] != shapes[1] or sizes[0] != sizes[1]:
        raise UserError(
            f"baseline and reinforced models differ: LM head {shapes[0]} vs {shapes[1]}, vocab_size {sizes[0]} vs {sizes[1]}"
        )


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """`[-100] + labels[:-1]` per block: HF causal-LM losses shift again, so the output at i trains toward label_i."""
    ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([ignore, labels[:, :-1]], dim=1)


def labels_from_hidden(
    translations: list[Translation],
    hidden_translated: torch.Tensor,
    hidden_original: torch.Tensor,
    wb: torch.Tensor,
    wr: torch.Tensor,
    alphas: list[float],
    impl: str = "auto",
) -> torch.Tensor:
    """HF-convention labels int64 [B, L, len(alphas)] from the two models' LM-head inputs.

    hidden_translated [B, T, H]: baseline on the (right-padded) translated blocks; hidden_original [B, L, H]:
    reinforced model on the original blocks. Baseline rows are gathered through each position map; rows
    without a counterpart get -100.
    """
    blocks, originals, translated, forbidden_rows = [], [], [], []
    for block_index, translation in enumerate(translations):
        for position, target in enumerate(translation.position_map):
            if target >= 0:
                blocks.append(block_index)
                originals.append(position)
                translated.append(target)
                forbidden_rows.append(translation.forbidden[target])
    batch_size, length = hidden_original.shape[:2]
    labels = torch.full((batch_size, length, len(alphas)), IGNORE_INDEX, dtype=torch.long)
    if blocks:
        device = hidden_translated.device  # the kernel runs where the baseline does

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        hb = hidden_translated[index(blocks), index(translated)]
        hr = hidden_original.to(device)[index(blocks), index(originals)]
        forbidden = _pad_rows(forbidden_rows, fill=-1).to(device)
        with nvtx_range("generic_labels"):  # visible in Nsight traces of the label step
            mixed = kernels.generic_labels(
                hb, wb, hr, wr.to(device), alphas, forbidden if forbidden.shape[1] else None, impl=impl
            )
        labels[torch.tensor(blocks), torch.tensor(originals)] = mixed.cpu()
    return shift_labels(labels)


def _pad_rows(rows: list[list[int]], fill: int) -> torch.Tensor:
    padded = torch.full((len(rows), max(map(len, rows), default=0)), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return padded


@dataclass
class LabelSet:
    """Original blocks and their generic labels, one label column per α, in the HF causal-LM convention."""

    input_ids: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor  # int64 [B, L, A]: model(input_ids, labels=labels[..., a]).loss trains on alphas[a]
    alphas: list[float]
    stats: dict

    def save(self, path: str | Path) -> None:
        path = Path(path)
        columns = {"input_ids": self.input_ids.numpy(), "labels": self.labels.numpy()}
        datasets.Dataset.from_dict(columns).save_to_disk(str(path))
        (path / META_FILE).write_text(json.dumps({"alphas": self.alphas, "stats": self.stats}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LabelSet:
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise UserError(f"no label set in {path} (missing {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        columns = datasets.load_from_disk(str(path)).with_format("torch")[:]
        return cls(columns["input_ids"].long(), columns["labels"].long(), meta["alphas"], meta["stats"])


def _label_batch(baseline, reinforced, tokenizer, blocks: list[Block], block_ids: list[int], anchors, cfg: LabelConfig, wb, wr, counts) -> torch.Tensor:
    """Labels int64 [len(blocks), L, len(cfg.alphas)]; block i draws its translations from
    `random.Random(f"{seed}:{block_ids[i]}")`, so labels depend on neither the batch nor the order of requests."""
    translations = [
        translate_block(block, anchors, tokenizer, random.Random(f"{cfg.seed}:{block_id}"), cfg.forbid_anchor_keys)
        for block_id, block in zip(block_ids, blocks)
    ]
    translated_ids = _pad_rows([t.translated_ids for t in translations], fill=0)
    attention_mask = _pad_rows([[1] * len(t.translated_ids) for t in translations], fill=0)
    hidden_translated = final_hidden_states(baseline, translated_ids.to(baseline.device), attention_mask.to(baseline.device))
    original_ids = torch.tensor([block.input_ids for block in blocks], device=reinforced.device)
    hidden_original = final_hidden_states(reinforced, original_ids)
    for translation in translations:
        counts["ignored_positions"] += translation.position_map.count(-1)
        counts["anchors_matched"] += translation.matched
        counts["anchors_skipped"] += translation.skipped
        counts["unaligned_positions"] += translation.unaligned
        counts["max_translated_length"] = max(counts["max_translated_length"], len(translation.translated_ids))
    return labels_from_hidden(translations, hidden_translated, hidden_original, wb, wr, cfg.alphas, impl=cfg.impl)


def _check_models(baseline, reinforced, blocks: list[Block]) -> None:
    check_same_vocabulary(baseline, reinforced)
    baseline.eval()
    reinforced.eval()
    if blocks:
        sample = torch.tensor([blocks[0].input_ids[:16]])
        check_head_gives_logits(baseline, sample.to(baseline.device), "baseline")
        check_head_gives_logits(reinforced, sample.to(reinforced.device), "reinforced")


def build_labels(
    baseline, reinforced, tokenizer, blocks: list[Block], anchors: dict[str, list[str]], cfg: LabelConfig, progress=True
) -> LabelSet:
    """Generic labels for every block, `cfg.batch_size` blocks per forward pass of each frozen model."""
    _check_models(baseline, reinforced, blocks)
    label_batches, counts = [], defaultdict(int)
    bar = tqdm(total=len(blocks), desc="generic labels", unit="block", disable=not progress)
    with torch.no_grad(), lm_head_weights(baseline, reinforced) as (wb, wr), bar:
        for first in range(0, len(blocks), cfg.batch_size):
            batch = blocks[first : first + cfg.batch_size]
            ids = list(range(first, first + len(batch)))
            label_batches.append(_label_batch(baseline, reinforced, tokenizer, batch, ids, anchors, cfg, wb, wr, counts))
            bar.update(len(batch))
    input_ids = torch.tensor([block.input_ids for block in blocks], dtype=torch.long)
    labels = torch.cat(label_batches)
    return LabelSet(input_ids, labels, cfg.alphas, _stats(input_ids, labels, cfg.alphas, counts))


class GenericLabeler:
    """Generic labels on demand for any blocks of the corpus, as the trainer asks for them: the unlearn
    phase's `LabelSource`, in process or inside a labeler actor.

    Each block is labeled once (the frozen models are deterministic); later epochs reuse the labels kept
    in memory: a few bytes per token, never logits.
    """

    def __init__(self, baseline, reinforced, tokenizer, blocks: list[Block], anchors: dict[str, list[str]], cfg: LabelConfig, shard_group=None):
        """`shard_group`: the torch.distributed group whose ranks share ZeRO-3-sharded models (None: unsharded)."""
        _check_models(baseline, reinforced, blocks)
        self.models, self.tokenizer, self.blocks, self.anchors, self.cfg = (baseline, reinforced), tokenizer, blocks, anchors, cfg
        self.shard_group = shard_group
        self.column = cfg.alphas.index(cfg.alpha)
        self.cache: dict[int, torch.Tensor] = {}  # block id → int32 [L, len(alphas)]
        self.counts: dict[str, int] = defaultdict(int)
        self.tokens_labeled, self.busy_seconds = 0, 0.0

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Labels int64 [len(block_ids), L] for the trained α."""
        missing = sorted({int(i) for i in block_ids} - self.cache.keys())
        batches = [missing[first : first + self.cfg.batch_size] for first in range(0, len(missing), self.cfg.batch_size)]
        rounds = self._rounds(len(batches))
        if rounds:
            start = time.perf_counter()
            baseline, reinforced = self.models
            with torch.no_grad(), lm_head_weights(baseline, reinforced) as (wb, wr):
                for ids in batches:
                    batch = [self.blocks[i] for i in ids]
                    labels = _label_batch(baseline, reinforced, self.tokenizer, batch, ids, self.anchors, self.cfg, wb, wr, self.counts)
                    self.cache.update(zip(ids, labels.to(torch.int32)))
                for _ in range(rounds - len(batches)):  # the shard group's ZeRO-3 gathers need every rank's forwards
                    _label_batch(baseline, reinforced, self.tokenizer, self.blocks[:1], [0], self.anchors, self.cfg, wb, wr, defaultdict(int))
            self.tokens_labeled += len(missing) * len(self.blocks[0].input_ids)
            self.busy_seconds += time.perf_counter() - start
        if block_ids.numel() == 0:
            return torch.empty(0, len(self.blocks[0].input_ids), dtype=torch.long)
        return torch.stack([self.cache[int(i)][:, self.column] for i in block_ids]).long()

    def _rounds(self, batches: int) -> int:
        """Forward batches to run: this labeler's own, or the most any rank of its shard group needs."""
        if self.shard_group is None:
            return batches
        most = torch.tensor([batches], device=self.models[0].device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.shard_group)
        return int(most.item())

    def scalars(self) -> dict[str, float]:
        return {}

    def stats(self) -> dict:
        """The label statistics of `LabelSet.stats` over the blocks labeled so far."""
        ids = sorted(self.cache)
        input_ids = torch.tensor([self.blocks[i].input_ids for i in ids], dtype=torch.long)
        labels = torch.stack([self.cache[i] for i in ids]).long() if ids else torch.empty(0, 0, len(self.cfg.alphas), dtype=torch.long)
        return _stats(input_ids, labels, self.cfg.alphas, self.counts)


def _stats(input_ids: torch.Tensor, labels: torch.Tensor, alphas: list[float], counts: dict) -> dict:
    labeled = labels[..., 0] != IGNORE_INDEX  # the same positions for every α
    changed = (labels != IGNORE_INDEX) & (labels != input_ids.unsqueeze(-1))  # HF convention: column i labels token i
    stats = {
        "blocks": input_ids.shape[0],
        "tokens": input_ids.numel(),
        **counts,
        "labeled_positions": int(labeled.sum()),
        "changed_positions": {f"{alpha:g}": int(n) for alpha, n in zip(alphas, changed.sum(dim=(0, 1)))},
    }
    return _with_fractions(stats)


def _with_fractions(stats: dict) -> dict:
    labeled = max(stats["labeled_positions"], 1)
    return {**stats, "changed_fraction": {alpha: round(n / labeled, 6) for alpha, n in stats["changed_positions"].items()}}


def merge_stats(parts: list[dict]) -> dict:
    """The statistics of several labelers' disjoint blocks as if one labeler had made them all."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if key == "changed_fraction":
                continue
            if key == "changed_positions":
                merged[key] = {alpha: merged.get(key, {}).get(alpha, 0) + n for alpha, n in value.items()}
            elif key == "max_translated_length":
                merged[key] = max(merged.get(key, 0), value)
            else:
                merged[key] = merged.get(key, 0) + value
    return _with_fractions(merged)
