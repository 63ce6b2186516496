"""Which blocks each rank trains on at each step, and the learning rate there."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from configs import TrainConfig
from engine.models import IGNORE_INDEX


@dataclass(frozen=True)
class Schedule:
    """Which blocks each rank trains on at each step: a pure function of (block count, config, world size).

    The validation split and every epoch's order are seeded by `cfg.seed`; each step takes the next
    `per_step` blocks and cuts them into one contiguous share per rank, so the global order does not depend
    on the world size and N ranks × micro-batch b train like 1 rank × N·b. Because it is pure, a resumed
    run and the labelers recompute it instead of storing it.
    """

    train_ids: torch.Tensor  # block ids of the training split
    val_ids: torch.Tensor  # block ids held out for validation
    local_blocks: int  # blocks per rank per step
    world_size: int
    total_steps: int
    steps_per_epoch: int
    seed: int

    @classmethod
    def make(cls, n_blocks: int, cfg: TrainConfig, world_size: int) -> Schedule:
        n_val = 0 if cfg.val_fraction == 0 or n_blocks < 2 else max(1, round(n_blocks * cfg.val_fraction))
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed))
        local_blocks = cfg.micro_batch_size * cfg.grad_accum
        steps_per_epoch = max(1, math.ceil((n_blocks - n_val) / (local_blocks * world_size)))
        total_steps = math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        return cls(order[n_val:], order[:n_val], local_blocks, world_size, total_steps, steps_per_epoch, cfg.seed)

    @property
    def val_share_size(self) -> int:
        return math.ceil(self.val_ids.numel() / self.world_size)

    def val_share(self, rank: int) -> torch.Tensor:
        """This rank's contiguous share of the validation blocks (the last ranks' may be short)."""
        size = self.val_share_size
        return self.val_ids[rank * size : (rank + 1) * size]

    def steps(self, first_step: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(step, the step's block ids over all ranks) from `first_step` on; epochs reshuffle and carry over."""
        per_step = self.local_blocks * self.world_size
        n_train = self.train_ids.numel()
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.empty(0, dtype=torch.long)
        for step in range(self.total_steps):
            while order.numel() < per_step:
                order = torch.cat([order, torch.randperm(n_train, generator=generator)])
            chosen, order = order[:per_step], order[per_step:]
            if step >= first_step:
                yield step, self.train_ids[chosen]

    def share(self, step_ids: torch.Tensor, rank: int) -> torch.Tensor:
        return step_ids[rank * self.local_blocks : (rank + 1) * self.local_blocks]

    def requests(self, first_step: int = 0) -> Iterator[list[torch.Tensor]]:
        """Per rank, the block ids `fit` asks labels for, in order: the validation share, then each step's share."""
        yield [self.val_share(rank) for rank in range(self.world_size)]
        for _, step_ids in self.steps(first_step):
            yield [self.share(step_ids, rank) for rank in range(self.world_size)]


def pad_blocks(input_ids: torch.Tensor, targets: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad with rows that count nothing to `size` (labels -100, value targets NaN): under ZeRO-3 a rank with
    one forward call fewer deadlocks the others."""
    pad = size - input_ids.shape[0]
    fill = float("nan") if targets.is_floating_point() else IGNORE_INDEX
    return torch.cat([input_ids, input_ids.new_zeros(pad, *input_ids.shape[1:])]), torch.cat([targets, targets.new_full((pad, *targets.shape[1:]), fill)])


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
