"""Training backends: one optimizer update over a rank's micro-batches, behind the protocol the loop uses.

`TorchBackend` trains in this process; `engine.training.zero.DeepSpeedBackend` is the same step sharded by
DeepSpeed ZeRO-3. Both minimize the phase's `Objective` on the `TokenScores` that their `Scorer` makes of
the trained model: its logits (`LogitScorer`), or offset unlearning's ensemble (`engine.training.offset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from configs import TrainConfig
from engine.models import load_model
from engine.training.objectives import NEXT_TOKEN, Objective, TokenScores, scores_from_logits

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (input_ids [b, L] or bundled [b, k, L], targets: one row per block, see objectives)


def bundled_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for [b, L] rows, or for bundled [b, k, L] rows in one forward pass: [b, (k,) L, V]."""
    logits = model(input_ids=input_ids.reshape(-1, input_ids.shape[-1])).logits
    return logits.view(*input_ids.shape, logits.shape[-1])


class Scorer(Protocol):
    """How a backend scores the labels an objective names: `model` is the trained module (or its ZeRO-3
    engine); the frozen models it needs are the scorer's own."""

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores: ...


@dataclass(frozen=True)
class LogitScorer:
    """`TokenScores` from the model's logits; with a frozen `reference` (a KL retain term), KL(reference ‖ model)
    on the retain rows from the reference's logits."""

    reference: torch.nn.Module | None = None

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> TokenScores:
        reference = None
        if self.reference is not None:
            with torch.no_grad():
                reference = self.reference(input_ids=input_ids[:, 1]).logits
        return scores_from_logits(bundled_logits(model, input_ids), labels, reference)


@dataclass
class StepStats:
    loss: float  # the objective averaged over the whole optimizer step (all ranks)
    grad_norm: float
    tokens: int  # the objective's units over all ranks (trained tokens for the token-level objectives)


class TrainBackend(Protocol):
    """What the loop needs from an engine. One call of `train_step` is one optimizer update.

    Every rank of a distributed backend runs `fit` and must make the same sequence of calls.
    """

    rank: int
    world_size: int

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepStats: ...

    def eval_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(summed objective, its units) without gradients."""
        ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The current model's logits in eval mode, without gradients (every rank calls it alike)."""
        ...

    def extrapolate_from(self, reference: Path, scale: float) -> None:
        """Task arithmetic in place: θ ← θ_ref − scale·(θ − θ_ref), θ_ref the model directory `reference`."""
        ...

    def save(self, path: Path) -> None:
        """Write the current weights as a Hugging Face safetensors directory."""
        ...

    def save_state(self, directory: Path) -> None:
        """Write this rank's weights and optimizer state into an existing directory (for resuming)."""
        ...

    def load_state(self, directory: Path) -> None: ...

    def all_reduce(self, *values: float) -> list[float]:
        """Sums over ranks."""
        ...

    def barrier(self) -> None: ...


class TorchBackend:
    """Single-process training: AdamW on fp32 master weights, bf16 autocast on GPU when asked."""

    rank, world_size = 0, 1

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        save_fn: Callable[[torch.nn.Module, Path], None],
        autocast_dtype: torch.dtype | None = None,
        objective: Objective = NEXT_TOKEN,
        scorer: Scorer = LogitScorer(),
    ):
        self.model, self.objective, self.scorer = model, objective, scorer
        self.device = next(model.parameters()).device
        self.cfg = cfg
        self.save_fn = save_fn
        self.autocast_dtype = autocast_dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self._autocast():
            return bundled_logits(self.model, input_ids.to(self.device))

    def _loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ids, targets = input_ids.to(self.device), targets.to(self.device)
        with self._autocast():
            scores = self.scorer(self.model, ids, self.objective.labels(ids, targets))
        return self.objective.loss_sum(scores, ids, targets)

    @torch.no_grad()
    def extrapolate_from(self, reference: Path, scale: float) -> None:
        theirs = dict(load_model(reference, "task-arithmetic reference", self.device).named_parameters())
        for name, mine in self.model.named_parameters():
            mine.copy_(theirs[name] - scale * (mine - theirs[name]))

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepStats:
        self.model.train()
        total_units = sum(self.objective.units(input_ids, targets) for input_ids, targets in micro_batches)
        if total_units == 0:  # nothing selected (SGA): no update, not even the optimizer's momentum
            return StepStats(loss=0.0, grad_norm=0.0, tokens=0)
        loss_sum = 0.0
        for input_ids, targets in micro_batches:
            loss = self._loss(input_ids, targets)
            (loss / max(total_units, 1)).backward()
            loss_sum += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss=loss_sum / max(total_units, 1), grad_norm=float(grad_norm), tokens=total_units)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        self.model.eval()
        return float(self._loss(input_ids, targets)), self.objective.units(input_ids, targets)

    def save(self, path: Path) -> None:
        self.save_fn(self.model, path)

    def save_state(self, directory: Path) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / "backend.pt")

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / "backend.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def all_reduce(self, *values: float) -> list[float]:
        return list(values)

    def barrier(self) -> None:
        pass
