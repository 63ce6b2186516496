"""The WHP recipe, top to bottom: reinforce → unlearn on generic labels → evaluate → report.

Every command of the CLI is a slice of `run`: the phases chain through the run directory
(`reinforced/`, `unlearned/`, `metrics.json`), so `obliviate unlearn` after `obliviate reinforce --out R`
finds `R/reinforced` by itself. The unlearn phase makes its generic labels while it trains (a labeler
streams them to the trainer); `obliviate labels` exports them to `labels/` for inspection only. All inputs
are checked before anything is written, each phase's output appears atomically once complete, and a phase
interrupted or crashed continues from `checkpoints/PHASE/` with `resume`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoConfig

from configs import RunConfig, save_config
from engine.data.anchors import load_anchors
from engine.data.corpus import make_blocks, read_corpus
from configs.errors import UserError
from engine.evaluation.suite import Suite, compare_to_oracle, evaluate_model, load_suite
from engine.methods.generic_labels import LabelSet, build_labels
from engine.models import check_model_dir, check_same_tokenizer, load_model, load_tokenizer, pick_device
from engine.training.job import LabelerSpec, LocalTrainer, PhaseResult, TrainJob
from engine.evaluation.report import format_table, write_report
from kernels.mixing import interpreter_requested

log = logging.getLogger("obliviate")

RUN_PHASES = ("reinforce", "unlearn", "eval")  # labels is an export, not a step of the recipe
TRAINING_SUMMARY = "obliviate_training.json"  # beside the unlearned weights: how they were made


@dataclass(frozen=True)
class RunDir:
    """Layout of a run directory; each phase owns one output."""

    root: Path

    @property
    def outputs(self) -> dict[str, Path]:
        return {"reinforce": self.root / "reinforced", "labels": self.root / "labels", "unlearn": self.root / "unlearned", "eval": self.root / "metrics.json"}

    def claim(self, phases: list[str], overwrite: bool, resume: bool = False) -> list[str]:
        """The phases to run. A finished phase output is kept and skipped with `resume`, replaced with
        `overwrite` (the old output stays until the new one is complete), and refused otherwise."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output path {self.root} exists and is not a directory")
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")
        todo = []
        for phase in phases:
            output = self.outputs[phase]
            if output.exists() and resume:
                log.info("%s: finished earlier, kept (%s)", phase, output)
            elif output.exists() and not overwrite:
                raise UserError(f"{self.root} already holds a finished {phase} phase ({output.name}); pass --overwrite to replace it or --resume to keep it")
            else:
                todo.append(phase)
        return todo

    def checkpoints(self, phase: str) -> Path:
        return self.root / "checkpoints" / phase

    @contextmanager
    def opened(self, cfg: RunConfig, command: str):
        """Create the directory, record the resolved config, and log to run.log while the command runs."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.root / "config.yaml")
        handler = logging.FileHandler(self.root / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        log.setLevel(logging.INFO)  # the run log keeps the phase record whatever the console shows
        log.info("obliviate %s → %s", command, self.root)
        try:
            yield self
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    def staging(self, phase: str, clear: bool = True) -> Path:
        """Where a phase writes until it is complete; cleared of an earlier crash's leftovers unless resuming
        (it then holds the best model so far, which the checkpoint's record refers to)."""
        output = self.outputs[phase]
        staging = output.with_name(f".{output.name}.partial")
        if clear:
            shutil.rmtree(staging, ignore_errors=True)
        return staging

    def publish(self, phase: str) -> Path:
        """Swap the completed staging output in place of the phase's output."""
        output = self.outputs[phase]
        shutil.rmtree(output, ignore_errors=True)
        os.replace(output.with_name(f".{output.name}.partial"), output)
        return output


def anchor_terms(path: str) -> list[str]:
    """Every surface term of the dictionary (dropped keys included): what a completion may reveal."""
    anchors = load_anchors(path)
    return sorted(set(anchors.terms) | {key for key, _ in anchors.dropped})


def _required(value: str, what: str, flag: str) -> str:
    if not value:
        raise UserError(f"no {what} given (use {flag} or set it in the config)")
    return value


@dataclass
class Inputs:
    """Everything a run needs, loaded and checked before the run directory is touched."""

    baseline: Path | None  # None when only evaluating
    reinforced: Path | None  # None: the reinforce phase produces it
    tokenizer: object
    target_blocks: list
    anchors: dict[str, list[str]] | None
    deepspeed: dict  # the user's DeepSpeed JSON (engine.deepspeed), merged over the generated config
    suite: Suite | None  # the evaluation suite's inputs


def check_inputs(cfg: RunConfig, run: RunDir, phases: list[str]) -> Inputs:
    baseline = tokenizer = reinforced = anchors = None
    blocks = []
    if {"reinforce", "labels", "unlearn"} & set(phases):
        baseline = check_model_dir(_required(cfg.baseline, "baseline model", "--baseline"), "baseline")
        tokenizer = load_tokenizer(baseline, "baseline")
    if {"reinforce", "labels", "unlearn"} & set(phases):
        positions = getattr(AutoConfig.from_pretrained(baseline), "max_position_embeddings", None)
        if positions is not None and positions < cfg.labels.context_length:
            raise UserError(f"labels.context_length={cfg.labels.context_length} exceeds the baseline's {positions} positions")
        target = _required(cfg.target, "target corpus", "--target")
        blocks = make_blocks(read_corpus(target), tokenizer, cfg.labels.context_length, name=f"target corpus {target}")
    if {"labels", "unlearn"} & set(phases):
        anchors_file = load_anchors(_required(cfg.anchors, "anchor dictionary", "--anchors"))
        for key, reason in anchors_file.dropped:
            log.info("anchor %r dropped: %s", key, reason)
        anchors = anchors_file.terms
        if "reinforce" not in phases:
            reinforced = check_model_dir(cfg.reinforced or run.outputs["reinforce"], "reinforced")
            check_same_tokenizer(tokenizer, load_tokenizer(reinforced, "reinforced"), ("baseline", "reinforced"))
    suite = None
    if "eval" in phases:
        if cfg.oracle:
            check_model_dir(cfg.oracle, "oracle")
        suite = load_suite(cfg.eval, pick_device(cfg.device))
    return Inputs(baseline, reinforced, tokenizer, blocks, anchors, _deepspeed_json(cfg.engine.deepspeed), suite)


def _deepspeed_json(path: str) -> dict:
    if not path:
        return {}
    try:
        config = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise UserError(f"cannot read the DeepSpeed config {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"the DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"the DeepSpeed config {path} must be a JSON object")
    return config


def _job(cfg: RunConfig, run: RunDir, phase: str, inputs: Inputs, labeler: LabelerSpec | None, resume: bool) -> TrainJob:
    if not resume:
        shutil.rmtree(run.checkpoints(phase), ignore_errors=True)  # an earlier crash's, now stale
    return TrainJob(
        phase=phase,
        init=inputs.baseline,
        train=getattr(cfg, phase),
        input_ids=torch.tensor([b.input_ids for b in inputs.target_blocks]),
        labeler=labeler,
        save_to=run.staging(phase, clear=not resume),
        keep_best=phase == "unlearn",
        checkpoint_dir=run.checkpoints(phase),
        checkpoint_every=cfg.engine.checkpoint_every,
        tb_dir=run.root / "tb" / phase,
        dtype=cfg.dtype,
        device=cfg.device,
        deepspeed=inputs.deepspeed,
    )


def _publish(cfg: RunConfig, run: RunDir, phase: str) -> Path:
    output = run.publish(phase)
    if not cfg.engine.keep_checkpoints:
        shutil.rmtree(run.checkpoints(phase), ignore_errors=True)
        with contextlib.suppress(OSError):  # only when no other phase keeps its checkpoints there
            run.checkpoints(phase).parent.rmdir()
    return output


def reinforce(cfg: RunConfig, run: RunDir, inputs: Inputs, trainer, resume: bool) -> Path:
    """Phase 1: keep training the baseline on the target; only used to find target-specific tokens."""
    trainer.train(_job(cfg, run, "reinforce", inputs, None, resume), resume)
    return _publish(cfg, run, "reinforce")


def make_labels(cfg: RunConfig, run: RunDir, inputs: Inputs, reinforced_dir: Path, device: torch.device) -> LabelSet:
    """Export: generic labels of every block, written to RUN/labels for inspection (unlearn makes its own)."""
    baseline = load_model(inputs.baseline, "baseline", device).eval()
    reinforced = load_model(reinforced_dir, "reinforced", device).eval()
    labels = build_labels(baseline, reinforced, inputs.tokenizer, inputs.target_blocks, inputs.anchors, cfg.labels)
    labels.save(run.staging("labels"))
    run.publish("labels")
    log.info("labels: %s", labels.stats)
    return labels


def unlearn(cfg: RunConfig, run: RunDir, inputs: Inputs, reinforced_dir: Path, trainer, resume: bool) -> PhaseResult:
    """Phase 2: fine-tune the baseline on (original tokens, generic labels made alongside by the labeler);
    keep the best validation loss."""
    labeler = LabelerSpec(inputs.baseline, reinforced_dir, inputs.target_blocks, inputs.anchors, cfg.labels)
    job = _job(cfg, run, "unlearn", inputs, labeler, resume)
    phase = trainer.train(job, resume)
    result = phase.fit
    log.info("unlearn: best validation loss %.4f at step %d of %d", result.best_val_loss, result.best_step, result.steps)
    summary = {
        "alpha": cfg.labels.alpha,
        "forbid_anchor_keys": cfg.labels.forbid_anchor_keys,
        "best_step": result.best_step,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "best_val_loss": result.best_val_loss,
        "label_stats": phase.label_stats,
        "workers": cfg.engine.workers,
        "throughput": phase.throughput,
    }
    (job.save_to / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    _publish(cfg, run, "unlearn")
    return phase


def describe(name: str, s: dict) -> str:
    """One report line on how an unlearned model was made, from the summary saved beside its weights."""
    changed = s["label_stats"].get("changed_fraction", {})
    speed = s.get("throughput", {})
    engine = f"{s['workers']} DeepSpeed ZeRO-3 worker(s)" if s.get("workers") else "in-process"
    return (
        f"{name}: α = {s['alpha']:g}, anchor keys forbidden: {s['forbid_anchor_keys']}; kept step {s['best_step']} of {s['steps']} "
        f"(validation loss on generic labels {s['best_val_loss']:.4f}); {s['label_stats'].get('blocks')} blocks, "
        f"labels differing from the original next token per α: {changed}; trained {engine} at "
        f"{speed.get('tokens_per_s', 0):.0f} tokens/s, waiting for labels {100 * speed.get('label_wait_fraction', 0):.1f}% of the time"
    )


def evaluate(cfg: RunConfig, run: RunDir, models: dict[str, Path], device: torch.device, title: str, suite: Suite) -> dict:
    """Phase 3: the evaluation suite for each model, then each against the oracle; the report."""
    terms = anchor_terms(cfg.anchors) if cfg.anchors else []
    results = {}
    for name, path in models.items():
        log.info("evaluating %s (%s)", name, path)
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" and device.type == "cuda" else torch.float32
        model = load_model(path, name, device, dtype).eval()
        results[name] = evaluate_model(model, load_tokenizer(path, name), cfg.eval, terms, suite)
    compare_to_oracle(results)
    with SummaryWriter(str(run.root / "tb" / "eval")) as writer:
        for name, result in results.items():
            for metric, value in result.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"{name}/{metric}", value, 0)
    summaries = {name: json.loads((Path(path) / TRAINING_SUMMARY).read_text()) for name, path in models.items() if (Path(path) / TRAINING_SUMMARY).is_file()}
    notes = [describe(name, summary) for name, summary in summaries.items()]
    write_report(run.root, results, title=title, notes=notes, extra={"training": summaries})
    print(format_table(results))
    print(f"\nreport: {run.root / 'report.md'}")
    return results


def run(cfg: RunConfig, phases: list[str], overwrite: bool, command: str, eval_models: dict[str, Path] | None = None, title: str = "obliviate run", trainer=None, resume: bool = False) -> dict | None:
    """Run the given phases in order with `trainer` (default: in this process); `eval_models` overrides which
    models the eval phase compares. With `resume`, finished phases are kept and an interrupted one continues."""
    run_dir = RunDir(Path(cfg.out).expanduser())
    phases = run_dir.claim(phases, overwrite, resume)
    inputs = check_inputs(cfg, run_dir, phases)
    device = pick_device(cfg.device)
    if "labels" in phases and cfg.labels.impl == "triton" and device.type == "cpu" and not interpreter_requested():
        raise UserError("labels.impl=triton on CPU needs the Triton interpreter: set TRITON_INTERPRET=1")
    with run_dir.opened(cfg, command):
        return _run_phases(cfg, run_dir, inputs, phases, device, eval_models, title, trainer or LocalTrainer(), resume)


def _run_phases(cfg, run_dir: RunDir, inputs: Inputs, phases: list[str], device, eval_models, title, trainer, resume: bool) -> dict | None:
    reinforced_dir = inputs.reinforced
    if "reinforce" in phases:
        reinforced_dir = reinforce(cfg, run_dir, inputs, trainer, resume)
    if "labels" in phases:
        make_labels(cfg, run_dir, inputs, reinforced_dir, device)
    if "unlearn" in phases:
        unlearn(cfg, run_dir, inputs, reinforced_dir, trainer, resume)
    if "eval" not in phases:
        return None
    models = dict(eval_models or {"baseline": inputs.baseline, "unlearned": run_dir.outputs["unlearn"]})
    if cfg.oracle and "oracle" not in models:
        models["oracle"] = Path(cfg.oracle).expanduser()
    return evaluate(cfg, run_dir, models, device, title, inputs.suite)
