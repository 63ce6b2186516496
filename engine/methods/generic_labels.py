"""Generic labels: the WHP teacher, which streams them to the trainer while it trains (docs/algorithm.md).

Per block: translate the anchors, run the baseline on the translated tokens and the reinforced model on
the original ones, and let `kernels.generic_labels` mix the two heads and pick the labels, so logits never
materialize. The translated block is run as it comes out of the tokenizer, so it may be a few tokens longer
or shorter than `context_length`; the baseline must accept that length (`stats["max_translated_length"]`
reports the longest).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import kernels
from configs.schema import LabelConfig
from engine.data.corpus import Block
from engine.data.label_sets import LabelSet, label_stats, merge_stats
from engine.data.translation import Translation, translate_block
from engine.training.job import forward_rounds
from engine.models import IGNORE_INDEX, load_model, load_tokenizer, check_head_gives_logits, check_same_vocabulary, final_hidden_states, lm_head_weights
from kernels.device import nvtx_range


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
    return LabelSet(input_ids, labels, cfg.alphas, label_stats(input_ids, labels, cfg.alphas, counts))


@dataclass
class LabelerSpec:
    """WHP's `TeacherSpec`: what a labeler needs — the two frozen models, the blocks and the anchor dictionary."""

    role: ClassVar[str] = "labeler"

    baseline: Path
    reinforced: Path
    blocks: list[Block]
    anchors: dict[str, list[str]]
    labels: LabelConfig

    def build(self, device: torch.device, dtype: torch.dtype = torch.float32) -> GenericLabeler:
        baseline = load_model(self.baseline, "baseline", device, dtype).eval()
        reinforced = load_model(self.reinforced, "reinforced", device, dtype).eval()
        return GenericLabeler(baseline, reinforced, load_tokenizer(self.baseline, "baseline"), self.blocks, self.anchors, self.labels)

    def build_sharded(self, dtype: torch.dtype = torch.float32) -> GenericLabeler:
        """One rank of a labeler group (torchrun-style env) holding 1/WORLD_SIZE of both frozen models under
        ZeRO-3: for models too big for one device. Every rank of the group must label in step."""
        from engine.training.zero import frozen_zero3

        engines = [frozen_zero3(path, dtype) for path in (self.baseline, self.reinforced)]
        baseline, reinforced = (engine.module.eval() for engine in engines)
        labeler = GenericLabeler(baseline, reinforced, load_tokenizer(self.baseline, "baseline"), self.blocks, self.anchors, self.labels, shard_group=dist.group.WORLD)
        labeler.engines = engines  # the engines own the hooks that gather each layer's shards in forward
        return labeler

    def merge_stats(self, parts: list[dict]) -> dict:
        return merge_stats(parts)


class GenericLabeler:
    """Generic labels on demand for any blocks of the corpus, as the trainer asks for them: the unlearn
    phase's `Teacher`, in process or inside a teacher actor.

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
        self.units_done, self.busy_seconds = 0, 0.0

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Labels int64 [len(block_ids), L] for the trained α."""
        missing = sorted({int(i) for i in block_ids} - self.cache.keys())
        batches = [missing[first : first + self.cfg.batch_size] for first in range(0, len(missing), self.cfg.batch_size)]
        rounds = forward_rounds(len(batches), self.shard_group, self.models[0].device)
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
            self.units_done += len(missing) * len(self.blocks[0].input_ids)
            self.busy_seconds += time.perf_counter() - start
        if block_ids.numel() == 0:
            return torch.empty(0, len(self.blocks[0].input_ids), dtype=torch.long)
        return torch.stack([self.cache[int(i)][:, self.column] for i in block_ids]).long()

    def scalars(self) -> dict[str, float]:
        return {}

    def stats(self) -> dict:
        """The label statistics of `LabelSet.stats` over the blocks labeled so far."""
        ids = sorted(self.cache)
        input_ids = torch.tensor([self.blocks[i].input_ids for i in ids], dtype=torch.long)
        labels = torch.stack([self.cache[i] for i in ids]).long() if ids else torch.empty(0, 0, len(self.cfg.alphas), dtype=torch.long)
        return label_stats(input_ids, labels, self.cfg.alphas, self.counts)
