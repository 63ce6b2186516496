"""Generic-label sets as files (`obliviate labels` exports one for inspection) and their statistics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from configs.errors import UserError
from engine.models import IGNORE_INDEX

META_FILE = "labelset.json"


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


def label_stats(input_ids: torch.Tensor, labels: torch.Tensor, alphas: list[float], counts: dict) -> dict:
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
