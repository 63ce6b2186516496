"""`obliviate compare`: several unlearning methods from one baseline on the same data, one evaluation, one table.

Each method trains through the recipe into its own run directory `RUN/<method>` (a config derived with
`method=<method>`, `out=RUN/<method>`), all on one runner; a named variant (`Plan.runs`: name → config
changes, e.g. `whp-forbid` → `method=whp, labels.forbid_anchor_keys=true`) trains like a method into `RUN/<name>`; then one evaluation compares the baseline, each
method's `RUN/<method>/unlearned` and the oracle (RUN/metrics.json, RUN/report.md), so the baseline is
evaluated once; then RUN/comparison.json, .md and .png (engine/evaluation/comparison.py). Nothing here is
specific to a method: the registry names them, and each one's training phases are `recipe.all_phases` minus
the evaluation.

Order, so that bad input refuses before anything trains: `parse_methods` (every name known, none twice),
`claim` (every method's run directory and RUN's metrics.json, with --overwrite / --resume), `check` (every
method's inputs, the oracle and the evaluation suite), then `run`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from configs import RunConfig, derive
from configs.errors import UserError
from engine import recipe
from engine.evaluation.comparison import build_comparison, markdown_table, results_from_metrics, write_comparison
from engine.methods import METHODS, method_class
from engine.models import check_model_dir, check_tokenizer_fits, load_tokenizer
from engine.training.job import Runner

log = logging.getLogger("obliviate")

RESERVED = ("baseline", "oracle")  # the evaluation's other models


def parse_methods(text: str) -> list[str]:
    """`--methods whp,ga`: registered names, each once; a one-line UserError otherwise."""
    names = [name.strip() for name in (text or "").split(",")]
    if not any(names):
        raise UserError(f"--methods is empty: give comma-separated method names (known: {', '.join(METHODS)})")
    if not all(names):
        raise UserError(f"--methods {text!r} has an empty name: give comma-separated method names (known: {', '.join(METHODS)})")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"--methods names {', '.join(twice)} more than once: each method runs once")
    for name in names:
        if name in RESERVED:
            raise UserError(f"--methods: {name!r} names the evaluation's {name}, not a method (known: {', '.join(METHODS)})")
        method_class(name)  # unknown: one line listing the known ones
    return names


def method_config(cfg: RunConfig, name: str, changes: dict | None = None) -> RunConfig:
    """The run named `name`: the same config with `changes` (default: `method=name`), into RUN/name."""
    return derive(cfg, **(changes or {"method": name}), out=str(Path(cfg.out).expanduser() / name))


def training_phases(cfg: RunConfig) -> list[str]:
    return [phase for phase in recipe.all_phases(cfg) if phase != "eval"]


@dataclass
class Plan:
    runs: dict[str, dict]  # run name -> its config changes (`method=name` for a plain method)
    todo: dict[str, list[str]]  # per run, the training phases to run (finished ones kept with --resume)
    evaluate: bool  # RUN/metrics.json to be written (False: kept with --resume)

    @property
    def methods(self) -> list[str]:
        return list(self.runs)

    def config(self, cfg: RunConfig, name: str) -> RunConfig:
        return method_config(cfg, name, self.runs[name])


def claim(cfg: RunConfig, methods: list[str] | dict[str, dict], overwrite: bool, resume: bool) -> Plan:
    """Every run's directory and RUN's evaluation claimed before anything is built or trained: an existing
    output without --overwrite or --resume refuses here. `methods`: method names, or run names with their
    config changes (variants). Writes nothing."""
    if not cfg.out:
        raise UserError("no run directory given (use --out)")
    runs = dict(methods) if isinstance(methods, dict) else {name: {"method": name} for name in methods}
    evaluate = bool(recipe.run_dir(cfg).claim(["eval"], overwrite, resume))  # RUN itself first: its faults name it
    todo = {}
    for name, changes in runs.items():
        if name in RESERVED:
            raise UserError(f"{name!r} names the evaluation's {name}, not a method run")
        method_cfg = method_config(cfg, name, changes)
        todo[name] = recipe.run_dir(method_cfg).claim(training_phases(method_cfg), overwrite, resume)
    return Plan(runs, todo, evaluate)


def check(cfg: RunConfig, plan: Plan) -> None:
    """Every input the methods still to train, the oracle and the evaluation need, checked before the first
    method trains (a second method's bad input must not surface after the first one's hours). Writes nothing."""
    if not cfg.baseline:
        raise UserError("no baseline model given (use --baseline or set it in the config)")
    for name in plan.methods:
        if plan.todo[name]:
            method_cfg = plan.config(cfg, name)
            recipe.check_inputs(method_cfg, recipe.run_dir(method_cfg), method_class(method_cfg.method)(method_cfg), plan.todo[name])
    if cfg.oracle:
        oracle = check_model_dir(cfg.oracle, "oracle")
        check_tokenizer_fits(load_tokenizer(oracle, "oracle"), oracle, "oracle")
    recipe.check_inputs(cfg, recipe.run_dir(cfg), method_class(cfg.method)(cfg), ["eval"])


def _summary(model: Path) -> dict | None:
    record = model / recipe.TRAINING_SUMMARY
    return json.loads(record.read_text()) if record.is_file() else None


def _earlier_wall_seconds(root: Path) -> dict[str, float | None]:
    """A kept method's training seconds, from the comparison an earlier command wrote."""
    try:
        models = json.loads((root / "comparison.json").read_text()).get("models", {})
        return {name: row.get("wall_seconds") for name, row in models.items() if isinstance(row, dict)}
    except (OSError, ValueError, AttributeError):
        return {}


def train_all(cfg: RunConfig, plan: Plan, overwrite: bool, resume: bool, runner: Runner) -> tuple[dict, dict, dict]:
    """Each method's training phases in turn on `runner`: (models to evaluate, summaries made here, training
    records per method: wall seconds and the summary's flat record)."""
    earlier = _earlier_wall_seconds(Path(cfg.out).expanduser()) if resume else {}
    models, made, training = {}, {}, {}
    for name in plan.methods:
        method_cfg = plan.config(cfg, name)
        wall, summary = earlier.get(name), None
        if plan.todo[name]:
            log.info("compare: training %s into %s", name, method_cfg.out)
            start = time.perf_counter()
            result = recipe.run(method_cfg, training_phases(method_cfg), overwrite, f"compare ({name})", runner=runner, resume=resume)
            wall, summary = time.perf_counter() - start, result.summary
        models[name] = recipe.run_dir(method_cfg).outputs["unlearn"]
        if summary is not None:
            made[name] = summary
        training[name] = {"wall_seconds": wall, "summary": summary.as_json() if summary else _summary(models[name])}
    return models, made, training


def _stale(metrics_path: Path, names: set[str]) -> bool:
    """A kept metrics.json that does not evaluate exactly these models."""
    try:
        return set(json.loads(metrics_path.read_text()).get("models", {})) != names
    except (OSError, ValueError, AttributeError):
        return True


def run(cfg: RunConfig, plan: Plan, overwrite: bool, resume: bool, runner: Runner) -> dict:
    """Train every method, evaluate all models once, write the comparison; returns comparison.json's content."""
    root = Path(cfg.out).expanduser()
    trained, made, training = train_all(cfg, plan, overwrite, resume, runner)
    models = {"baseline": Path(cfg.baseline).expanduser(), **trained}
    names = {*models, *(("oracle",) if cfg.oracle else ())}
    title = f"obliviate compare: {', '.join(plan.methods)}"
    metrics = None
    if plan.evaluate or made or _stale(root / "metrics.json", names):  # a kept evaluation of other models is redone
        again = not plan.evaluate
        result = recipe.run(cfg, ["eval"], overwrite or again, "compare", eval_models=models, title=title, runner=runner, resume=resume and not again, made=made)
        metrics = result.metrics
    if metrics is None:
        metrics = results_from_metrics(json.loads((root / "metrics.json").read_text()))
    paths = {**{name: str(path) for name, path in models.items()}, **({"oracle": str(Path(cfg.oracle).expanduser())} if cfg.oracle else {})}
    comparison = build_comparison(metrics, plan.methods, training, title=title, paths=paths)
    write_comparison(root, comparison)
    print("\n" + markdown_table(comparison))
    print(f"\ncomparison: {root / 'comparison.md'}")
    return comparison
