"""The evaluation's forward passes where a runner puts them: in this process, or on a group of ranks laid out
like the trainers (`engine.workers`, one GPU each), each holding the evaluated model ZeRO-3-partitioned.

The driver cuts each model's suite into items (`suite.workload`: tokenized, every random draw made) and ships
them to `measure_models` on every rank; rank r measures its contiguous share of each part (`inference.share`)
in lockstep with the others (`inference.in_lockstep`), and the driver joins the per-item results in rank order
(`suite.combine`). A single process is the group of one: the same functions measure every item there, so the
numbers agree. lm-eval runs whole on every rank, in lockstep, and rank 0's scores are kept.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import EvalConfig
from engine.evaluation.benchmarks import load_tasks
from engine.evaluation.inference import in_lockstep
from engine.evaluation.suite import Workload, measure
from engine.models import assemble, load_model, load_tokenizer, model_parts, pick_device, torch_dtype


@dataclass
class EvalJob:
    """One model to measure, as shipped to the ranks."""

    name: str  # how the report and errors name it ("unlearned")
    path: Path  # its Hugging Face directory (on storage every rank reads)
    work: Workload


def in_rank_group() -> bool:
    """This process is a rank of a torchrun-style group (a runner's `on_ranks`), not the driver."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def measure_models(jobs: list[EvalJob], cfg: EvalConfig, device: str, dtype: str, zero: dict) -> list[dict]:
    """Each model's `suite.measure` on this rank, in job order: in a rank group, its share with the model
    ZeRO-3-partitioned over the group (`zero`: the user's zero_optimization settings; an offset artifact's M,
    o and o′ each partitioned); in the driver, all of it with the model whole on `device`. One model at a
    time: each is freed before the next loads."""
    tasks = load_tasks(cfg.tasks, cfg.task_dirs) if cfg.tasks else None
    found = []
    for job in jobs:
        tokenizer = load_tokenizer(job.path, job.name)
        if not in_rank_group():
            on = pick_device(device)
            model = load_model(job.path, job.name, on, torch_dtype(dtype, on)).eval()
            found.append(measure(model, tokenizer, job.work, cfg, tasks))
            continue
        import torch.distributed as dist

        from engine.training.zero import ensure_distributed, frozen_zero3

        ensure_distributed()
        engines = [frozen_zero3(part, torch_dtype(dtype, pick_device(device)), zero) for part in model_parts(job.path, job.name)]
        model = assemble(job.path, job.name, [engine.module for engine in engines]).eval()  # the engines own the hooks that gather the shards
        with in_lockstep(model):
            found.append(measure(model, tokenizer, job.work, cfg, tasks, dist.get_rank(), dist.get_world_size()))
        del engines, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return found


def inference_zero(deepspeed: dict) -> dict:
    """What of a user's DeepSpeed JSON (engine.deepspeed) applies to a frozen model: zero_optimization's
    parameter offload and stage3_* settings (no optimizer is built, so nothing else does)."""
    zero = deepspeed.get("zero_optimization", {})
    return {key: value for key, value in zero.items() if key.startswith("stage3_") or key == "offload_param"}
