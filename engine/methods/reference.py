"""The frozen reference of NPO: streams each forget block's log-probability under the baseline, a float per
block, through the same teacher queues as WHP's labels. The log-probabilities come from the final hidden
states and the LM head in vocabulary chunks (`kernels.token_log_probs`): no [tokens × vocab] logits."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist

import kernels
from engine.data.corpus import Block
from engine.models import check_head_gives_logits, final_hidden_states, lm_head_weights, load_model
from engine.training.job import forward_rounds


@dataclass
class ReferenceSpec:
    """NPO's `TeacherSpec`: the frozen reference model and the forget blocks."""

    role: ClassVar[str] = "reference"

    model: Path
    blocks: list[Block]
    batch_size: int

    def build(self, device: torch.device, dtype: torch.dtype = torch.float32) -> ReferenceScorer:
        return ReferenceScorer(load_model(self.model, "reference", device, dtype).eval(), self.blocks, self.batch_size)

    def build_sharded(self, dtype: torch.dtype = torch.float32) -> ReferenceScorer:
        """One rank of a group holding 1/WORLD_SIZE of the reference under ZeRO-3 (torchrun-style env)."""
        from engine.training.zero import frozen_zero3

        engine = frozen_zero3(self.model, dtype)
        scorer = ReferenceScorer(engine.module.eval(), self.blocks, self.batch_size, shard_group=dist.group.WORLD)
        scorer.engine = engine  # owns the hooks that gather each layer's shards in forward
        return scorer

    def merge_stats(self, parts: list[dict]) -> dict:
        return {"blocks": sum(part["blocks"] for part in parts)}


class ReferenceScorer:
    """Log p_ref(block) on demand, float [n, 1]; each block scored once (the reference is frozen)."""

    def __init__(self, model, blocks: list[Block], batch_size: int, shard_group=None) -> None:
        if blocks:
            check_head_gives_logits(model, torch.tensor([blocks[0].input_ids[:16]], device=model.device), "reference")
        self.model, self.blocks, self.batch_size, self.shard_group = model, blocks, batch_size, shard_group
        self.cache: dict[int, float] = {}
        self.units_done, self.busy_seconds = 0, 0.0

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor:
        missing = sorted({int(i) for i in block_ids} - self.cache.keys())
        batches = [missing[first : first + self.batch_size] for first in range(0, len(missing), self.batch_size)]
        rounds = forward_rounds(len(batches), self.shard_group, self.model.device)
        start = time.perf_counter()
        with torch.no_grad():
            for index in range(rounds):  # past its own batches, a rank of a shard group runs dummy ones
                ids = batches[index] if index < len(batches) else [0]
                rows = torch.tensor([self.blocks[i].input_ids for i in ids], device=self.model.device)
                log_probs = self._log_probs(rows)
                if index < len(batches):
                    self.cache.update(zip(ids, log_probs.tolist()))
        self.units_done += len(missing) * (len(self.blocks[0].input_ids) if self.blocks else 0)
        self.busy_seconds += time.perf_counter() - start
        return torch.tensor([[self.cache[int(i)]] for i in block_ids], dtype=torch.float32).view(-1, 1)

    def _log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        """Σ_t log p_ref(x_t | x_<t) per row (every rank of a shard group enters the head gather together)."""
        hidden = final_hidden_states(self.model, rows)[:, :-1]
        with lm_head_weights(self.model) as (weight,):
            tokens = kernels.token_log_probs(hidden.reshape(-1, hidden.shape[-1]), weight, rows[:, 1:].reshape(-1))
        return tokens.view(rows.shape[0], -1).sum(1)

    def scalars(self) -> dict[str, float]:
        return {}

    def stats(self) -> dict:
        return {"blocks": len(self.cache)}
