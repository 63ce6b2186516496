"""General benchmarks through the lm-eval harness, in process: did the model stay capable?

`lm_eval.simple_evaluate` runs on the model object already in memory (no subprocess, no second copy of
the weights). Any lm-eval task works by name; `task_dirs` add local task YAMLs (how the tests and
air-gapped clusters run them). The default tasks download their data on first use: a task whose data
cannot be reached fails with one line naming it, before any other task runs.

lm-eval itself is imported inside the functions, so only a suite that lists tasks imports it: importing it
changes the process environment (HF_XET_HIGH_PERFORMANCE, and HF_HUB_ENABLE_HF_TRANSFER where hf_transfer is
installed), which every later subprocess of the run would inherit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

from configs.errors import UserError, first_line
from engine.evaluation.inference import inference, model_device


@lru_cache(maxsize=4)
def _task_manager(task_dirs: tuple[str, ...]):
    from lm_eval.tasks import TaskManager  # lazy: see the module docstring

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return TaskManager(include_path=list(task_dirs) or None)


def task_manager(task_dirs: Sequence[str] = ()):
    """lm-eval's index of its ~15k tasks plus the local ones (indexing takes seconds: kept per set of dirs)."""
    return _task_manager(tuple(str(d) for d in task_dirs))


def load_tasks(names: Sequence[str], task_dirs: Sequence[str] = ()) -> dict:
    """lm-eval task objects by name, data loaded; one-line errors for unknown tasks and unreachable data."""
    manager = task_manager(task_dirs)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval does not know the task(s) {', '.join(unknown)} (local task YAMLs go in a task directory)")
    tasks = {}
    for name in names:
        try:
            tasks.update(manager.load([name])["tasks"])
        except Exception as e:  # datasets and the hub raise many types for "cannot get the data"
            first = first_line(e)
            raise UserError(f"benchmark task {name!r}: its data cannot be loaded (offline? pre-download it or use a local task): {first}") from None
    return tasks


def run_benchmarks(model, tokenizer, tasks: dict, limit: int | None = None, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Per task, its metrics by name (acc, and acc_norm where the task has it): the numbers lm-eval reports under
    its default filter, standard errors left out."""
    from lm_eval import simple_evaluate  # lazy: see the module docstring
    from lm_eval.models.huggingface import HFLM

    with inference(model):  # HFLM switches the model to eval mode; `inference` gives it its mode back after
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
        output = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit, log_samples=False, bootstrap_iters=0, random_seed=0)
    if output is None:  # lm-eval reports on LOCAL_RANK 0 only: another rank of an evaluation group, whose rank 0 reports
        return {}
    scores = {}
    for name, metrics in output["results"].items():
        scores[name] = {key.split(",")[0]: float(value) for key, value in metrics.items() if key.endswith(",none") and isinstance(value, (int, float)) and "stderr" not in key}
    return scores
