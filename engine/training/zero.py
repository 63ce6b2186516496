"""The DeepSpeed ZeRO-3 `TrainBackend`: the same loop and objective as `TorchBackend`, sharded over ranks.

Every rank of the torch.distributed group holds one `DeepSpeedBackend` and calls `train_step` with its
own micro-batches; the step's loss is the token-weighted mean over all ranks' micro-batches, so
N ranks × micro-batch b train exactly like 1 rank × N·b. On CPU this runs with the CPU accelerator and
gloo (docs/engine.md); on GPU with NCCL.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from configs import TrainConfig
from engine.training.backends import LogitScorer, MicroBatch, Scorer, StepStats, bundled_logits
from engine.training.objectives import NEXT_TOKEN, Objective

# Consolidating a large model or a long evaluation can outlast the default 30 min collective timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
# The tag (subdirectory) of DeepSpeed's checkpoint inside each of fit()'s checkpoint directories.
CHECKPOINT_TAG = "zero"


def ensure_distributed() -> None:
    """Join the process group from torchrun-style env (RANK, WORLD_SIZE, MASTER_ADDR/PORT); NCCL on GPU, gloo on CPU."""
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def ds_config_for(cfg: TrainConfig, world_size: int, dtype: torch.dtype = torch.float32, user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for one phase, from the typed config; `user` (the escape hatch) is merged over it.

    No optimizer section: the backend passes a `torch.optim.AdamW` (identical to TorchBackend's, and on
    CPU it avoids JIT-compiling FusedAdam). The consolidated save needs the 16-bit gather flag.
    """
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, user or {})


def load_zero3_model(path_or_config: str | Path | PretrainedConfig, ds_config: dict[str, Any], dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build a causal LM already partitioned by ZeRO-3, so no rank ever holds the full model.

    `HfDeepSpeedConfig` makes transformers construct (and load weights) under `deepspeed.zero.Init`. It is
    dropped right after: while it lives, a later rank-0-only `from_pretrained` deadlocks.
    """
    ensure_distributed()
    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        if isinstance(path_or_config, PretrainedConfig):
            model = AutoModelForCausalLM.from_config(path_or_config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(Path(path_or_config).expanduser(), dtype=dtype)
    finally:
        del keep_alive
        unset_hf_deepspeed_config()
    return model


def frozen_zero3(path: str | Path, dtype: torch.dtype, zero: dict[str, Any] | None = None):
    """A frozen model for inference, 1/WORLD_SIZE of it on each rank of the current group (ZeRO-3): the
    engine's hooks gather each layer's shards in forward, so every rank must run the same forwards.
    `zero`: settings merged into `zero_optimization` (a user's parameter offload or persistence threshold)."""
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {**(zero or {}), "stage": 3}, "bf16": {"enabled": dtype == torch.bfloat16}}
    return deepspeed.initialize(model=load_zero3_model(path, config, dtype), config=config)[0]


class DeepSpeedBackend:
    """`TrainBackend` on a DeepSpeed ZeRO-3 engine; every rank must make the same sequence of calls."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None = None, objective: Objective = NEXT_TOKEN, scorer: Scorer = LogitScorer()):
        """`scorer`'s frozen models are partitioned like the trained one (`frozen_zero3`)."""
        ensure_distributed()
        self.cfg, self.objective, self.scorer = cfg, objective, scorer
        self.tokenizer, self.ds_config = tokenizer, ds_config
        self.dtype = next(model.parameters()).dtype
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        return bundled_logits(self.engine, input_ids.to(self.engine.device))

    def _loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ids, targets = input_ids.to(self.engine.device), targets.to(self.engine.device)
        return self.objective.loss_sum(self.scorer(self.engine, ids, self.objective.labels(ids, targets)), ids, targets)

    @torch.no_grad()
    def extrapolate_from(self, reference: Path, scale: float) -> None:
        """Task arithmetic on this rank's own ZeRO-3 partitions: the reference is built partitioned like the
        trained model (same shapes, same world), so partition i of each is the same slice; nothing is gathered.
        Only the weights change (the optimizer's master copy does not): it runs once, before the final save."""
        theirs = dict(load_zero3_model(reference, self.ds_config, self.dtype).named_parameters())
        for name, mine in self.engine.module.named_parameters():
            partition, reference_partition = mine.ds_tensor, theirs[name].ds_tensor
            partition.copy_(reference_partition - scale * (partition - reference_partition))

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepStats:
        """One optimizer update over this rank's micro-batches (any number; the last one is the boundary).

        Gradient = ∇ Σ_all-ranks summed objective / Σ_all-ranks units. DeepSpeed averages gradients over ranks
        and (by default) divides the loss by gradient_accumulation_steps, so each micro-batch's summed loss
        is scaled by world_size / global_units and backward runs with scale_wrt_gas=False.
        """
        self.engine.train()
        local_units = sum(self.objective.units(input_ids, targets) for input_ids, targets in micro_batches)
        (global_units,) = self.all_reduce(local_units)
        if global_units == 0:  # nothing selected on any rank (SGA): no update, the same on every rank
            return StepStats(loss=0.0, grad_norm=0.0, tokens=0)
        scale = self.world_size / max(global_units, 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for i, (input_ids, targets) in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            loss = self._loss(input_ids, targets)
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            self.engine.step()
            loss_sum += float(loss.detach())
        (global_loss,) = self.all_reduce(loss_sum)
        return StepStats(loss=global_loss / max(global_units, 1.0), grad_norm=float(self.engine.get_global_grad_norm()), tokens=int(global_units))

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """(summed objective, its units) over every rank's batch."""
        self.engine.eval()
        loss = self._loss(input_ids, targets)
        total, total_count = self.all_reduce(float(loss), self.objective.units(input_ids, targets))
        return total, int(total_count)

    def save(self, path: Path) -> None:
        """Consolidated HF safetensors directory, written by rank 0 into a temp dir and swapped in.

        All ranks must call it: DeepSpeed's own gather (the one behind `save_16bit_model`, which would
        write a pickle) assembles the full state dict layer by layer on rank 0.
        """
        state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank == 0:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self.engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
            except BaseException:  # a full disk: no half-written copy left beside the model
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        dist.barrier()

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint: every rank writes its ZeRO-3 shards of weights and optimizer state."""
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")

    def barrier(self) -> None:
        dist.barrier()
