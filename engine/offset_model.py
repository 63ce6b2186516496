"""The offset artifact as a causal LM: z = z_M + α·(z_o′ − z_o) from three Hugging Face models.

Offset unlearning (docs/methods.md) leaves M as it is and saves o′ beside `offset.json`, which names M, o
and α. `OffsetModel` runs the three models on the same tokens and adds their logits, so everything that
takes a transformers causal LM takes it: `generate`, lm-eval's HFLM, the evaluation suite, the attacks. Each
token costs three forward passes (M's, o's and o′'s), and the logits of all three exist at once (one
[tokens × vocab] tensor each: evaluation's, not training's, which never materializes them).

This module loads nothing: `engine.models` builds the parts, whole or ZeRO-3-partitioned, and hands them in.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from configs.errors import UserError, first_line

OFFSET_RECORD = "offset.json"  # beside o′'s weights in an offset artifact: what the ensemble is made of


@dataclass(frozen=True)
class OffsetRecord:
    """offset.json: the frozen models by absolute path and α; no forget data (the paper's privacy argument)."""

    baseline: Path  # M
    small: Path  # o; the artifact's own weights are o′
    alpha: float

    def write(self, artifact: str | Path) -> None:
        record = {"baseline": str(Path(self.baseline).expanduser().resolve()), "small": str(Path(self.small).expanduser().resolve()), "alpha": self.alpha}
        (Path(artifact) / OFFSET_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def read(cls, artifact: str | Path, role: str) -> OffsetRecord | None:
        """The record of an offset artifact, None for any other model directory; one-line errors for a record
        that is not JSON, lacks a field or has α ≤ 0 (whether M and o exist: `engine.models.check_model_dir`)."""
        file = Path(artifact).expanduser() / OFFSET_RECORD
        if not file.is_file():
            return None
        try:
            fields = json.loads(file.read_text())
            record = cls(Path(fields["baseline"]), Path(fields["small"]), float(fields["alpha"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"the {role} offset artifact's {file} is not a record of baseline, small and alpha ({first_line(e)})") from None
        if not math.isfinite(record.alpha) or record.alpha <= 0:
            raise UserError(f"the {role} offset artifact's {file} gives alpha {record.alpha}: the offset scale must be a finite number > 0")
        return record


class OffsetCache(Cache):
    """M's, o's and o′'s key/value caches as one `Cache`: each model reads and extends its own part, and what
    `generate` does to a cache (crop, reorder beams, repeat rows, its length) reaches all three through the
    shared layer objects."""

    def __init__(self, parts: list[Cache]):
        super().__init__(layers=[layer for part in parts for layer in part.layers])
        self.parts = parts

    @classmethod
    def empty(cls, models: list[torch.nn.Module]) -> OffsetCache:
        return cls([DynamicCache(config=model.config) for model in models])


class OffsetModel(PreTrainedModel, GenerationMixin):
    """z = z_M + α·(z_o′ − z_o) as a transformers causal LM. M and o are frozen (`requires_grad` off), so a
    fine-tune of the ensemble (the relearning attack) trains o′ only.

    Its config is a copy of M's (the vocabulary, special tokens and model type lm-eval reads) with the
    shortest of the three context lengths. The three caches travel as one `OffsetCache`.
    """

    # The parts run attention as they were loaded to; the copy of M's config only echoes M's choice.
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True

    def __init__(self, baseline: PreTrainedModel, small: PreTrainedModel, trained: PreTrainedModel, alpha: float):
        config = copy.deepcopy(baseline.config)
        lengths = [getattr(model.config, "max_position_embeddings", None) for model in (baseline, small, trained)]
        if None not in lengths:
            config.max_position_embeddings = min(lengths)
        super().__init__(config)  # no post_init (weight initialization): the parts arrive built and loaded
        self.baseline, self.small, self.trained, self.alpha = baseline, small, trained, alpha
        self.baseline.requires_grad_(False)
        self.small.requires_grad_(False)

    @property
    def parts(self) -> list[PreTrainedModel]:
        return [self.baseline, self.small, self.trained]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """`generate` must not make a cache of M's layers for the ensemble: `forward` makes an `OffsetCache`."""
        return False

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """fp32 ensemble logits (each part's in its own dtype, added in fp32); with `use_cache`, the
        `OffsetCache` to pass back for the next tokens (a new one when `cache` is None)."""
        if cache is not None and not isinstance(cache, OffsetCache):
            raise TypeError(f"an OffsetModel continues from the OffsetCache its forward returned, not a {type(cache).__name__}")
        if use_cache and cache is None:
            cache = OffsetCache.empty(self.parts)
        caches = cache.parts if cache is not None else [None] * 3
        big, small, trained = (
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=part_cache, use_cache=bool(use_cache), logits_to_keep=logits_to_keep, **kwargs).logits.float()
            for model, part_cache in zip(self.parts, caches)
        )
        offset = trained.sub_(small)  # in place (no fourth [tokens × vocab] tensor), and first: exactly z_M while o′ = o
        return CausalLMOutputWithPast(logits=offset.mul_(self.alpha).add_(big), cache=cache if use_cache else None)
