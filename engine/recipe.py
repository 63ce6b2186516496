"""A run, top to bottom: check the inputs → each training phase of the method → evaluate → report.

Every command of the CLI is a slice of `run`: the phases chain through the run directory (`reinforced/`,
`unlearned/`, `metrics.json`), so `obliviate unlearn` after `obliviate reinforce --out R` finds `R/reinforced`
by itself. The method (`engine/methods/`) says what each phase trains; a runner (`engine/training/runners/`)
trains it, in this process or on Ray. All inputs are checked before anything is written, each phase's output
appears atomically once complete, and a phase interrupted or crashed continues from `checkpoints/PHASE/`
with `resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoConfig

from configs import RunConfig, save_config
from configs.errors import UserError
from engine.data.anchors import Anchors, load_anchors
from engine.data.corpus import make_blocks, read_corpus
from engine.evaluation.attacks import attacked_models, describe_recovery, recovery
from engine.evaluation.report import format_table, write_report
from engine.evaluation.ranks import EvalJob, inference_zero, measure_models
from engine.evaluation.suite import Suite, combine, compare_to_oracle, evaluate_model, load_suite, workload
from engine.methods import METHODS, method_class
from engine.methods.base import Method, RunInputs, TrainingSummary
from engine.models import check_model_dir, check_tokenizer_fits, load_model, load_tokenizer, pick_device, torch_dtype
from engine.training.checkpoints import check_resumable, latest_checkpoint, record_inputs, record_path
from engine.offset_model import OffsetRecord
from engine.training.job import PhaseResult, Runner, TrainJob
from engine.training.runners.local import LocalRunner

log = logging.getLogger("obliviate")

TRAINING_SUMMARY = "obliviate_training.json"  # beside a trained model: how it was made


@dataclass(frozen=True)
class RunDir:
    """Layout of a run directory; each phase owns one output."""

    root: Path
    method_outputs: tuple[tuple[str, str], ...] = ()  # the method's own phases → output names

    @property
    def outputs(self) -> dict[str, Path]:
        names = {**dict(self.method_outputs), "unlearn": "unlearned", "eval": "metrics.json"}
        return {phase: self.root / name for phase, name in names.items()}

    def claim(self, phases: list[str], overwrite: bool, resume: bool = False) -> list[str]:
        """The phases to run. A finished phase output is kept and skipped with `resume`, replaced with
        `overwrite` (the old output stays until the new one is complete), and refused otherwise."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output path {self.root} exists and is not a directory")
        _check_writable(self.root)
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
    def opened(self, cfg: RunConfig, command: str, trains: bool, resume: bool):
        """Create the directory, record the resolved config, and log to run.log while the command runs.

        `config.yaml` records how the run's models are made: a command that trains writes it (a resumed one
        keeps the record it continues); any other command records its config beside it, never over it."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = self.root / "config.yaml"
        if not trains:
            record = self.root / f"config-{command.split()[0]}.yaml"
        if not (resume and record.exists()):
            save_config(cfg, record)
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


def _check_writable(root: Path) -> None:
    """The run directory can be made and written: probed with a throwaway folder in its nearest existing
    ancestor, before anything is loaded or written."""
    ancestor = root
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create the output directory {root}: {ancestor} is a file")
    try:
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".obliviate-probe-").cleanup()
    except OSError as e:
        raise UserError(f"cannot write the output directory {root}: {e.strerror or e} ({ancestor})") from None


def run_dir(cfg: RunConfig) -> RunDir:
    return RunDir(Path(cfg.out).expanduser(), tuple(method_class(cfg.method).outputs.items()))


def all_phases(cfg: RunConfig) -> list[str]:
    """What `obliviate run` runs: the method's training phases, then the evaluation."""
    return [*method_class(cfg.method)(cfg).phases, "eval"]


def check_paths(cfg: RunConfig, needed: tuple[str, ...] = ()) -> None:
    """The config's inputs exist (models whole), for a job that will run elsewhere: `needed` must be given."""
    for role in needed:
        _required(getattr(cfg, role), f"{role} {'model' if role == 'baseline' else 'corpus'}", f"--{role}")
    for role in ("baseline", "reinforced", "oracle"):
        if getattr(cfg, role):
            check_model_dir(getattr(cfg, role), role)
    if cfg.offset.small:
        check_model_dir(cfg.offset.small, "offset.small")
    for role, path in (("target corpus", cfg.target), ("retain corpus", cfg.retain), ("anchor dictionary", cfg.anchors), ("DeepSpeed config", cfg.engine.deepspeed)):
        if path and not Path(path).expanduser().exists():
            raise UserError(f"{role} not found: {path}")


def anchor_terms(anchors: Anchors | None) -> list[str]:
    """Every surface term of the dictionary (dropped keys included): what a completion may reveal."""
    if anchors is None:
        return []
    return sorted(set(anchors.terms) | {key for key, _ in anchors.dropped})


def _required(value: str, what: str, flag: str) -> str:
    if not value:
        raise UserError(f"no {what} given (use {flag} or set it in the config)")
    return value


@dataclass
class RunResult:
    """What a command produced, handed on in memory (metrics.json and the summaries are written from it)."""

    phases: dict[str, PhaseResult]  # each training phase run by this command
    summary: TrainingSummary | None  # what was recorded beside RUN/unlearned, when this command made it
    metrics: dict[str, dict] | None  # per evaluated model, when this command evaluated


@dataclass
class Checked:
    """Everything a run needs, loaded and checked before the run directory is touched."""

    inputs: RunInputs
    deepspeed: dict  # the user's DeepSpeed JSON (engine.deepspeed), merged over the generated config
    suite: Suite | None  # the evaluation suite's inputs


def check_inputs(cfg: RunConfig, run: RunDir, method: Method, todo: list[str]) -> Checked:
    deepspeed = _deepspeed_json(cfg.engine.deepspeed)
    baseline, tokenizer, blocks = None, None, []
    if any(phase != "eval" for phase in todo):  # training phases and exports read the baseline and the corpus
        baseline = check_model_dir(_required(cfg.baseline, "baseline model", "--baseline"), "baseline")
        if OffsetRecord.read(baseline, "baseline"):
            raise UserError(f"the baseline {baseline} is an offset artifact: training takes a Hugging Face model directory (evaluate the artifact with obliviate eval --model)")
        tokenizer = load_tokenizer(baseline, "baseline")
        check_tokenizer_fits(tokenizer, baseline, "baseline")
        positions = getattr(AutoConfig.from_pretrained(baseline), "max_position_embeddings", None)
        if positions is not None and positions < cfg.labels.context_length:
            raise UserError(f"labels.context_length={cfg.labels.context_length} exceeds the baseline's {positions} positions")
        target = _required(cfg.target, "target corpus", "--target")
        blocks = make_blocks(read_corpus(target), tokenizer, cfg.labels.context_length, name=f"target corpus {target}")
    elif cfg.baseline:  # evaluation compares against it (checked with the other models to evaluate)
        baseline = Path(cfg.baseline).expanduser()
    retain = make_blocks(read_corpus(cfg.retain), tokenizer, cfg.labels.context_length, name=f"retain corpus {cfg.retain}") if cfg.retain and blocks else []
    inputs = RunInputs(baseline, tokenizer, blocks, run.outputs, load_anchors(cfg.anchors) if cfg.anchors else None, retain)
    method.prepare(todo, inputs)
    suite = load_suite(cfg.eval, pick_device(cfg.device)) if "eval" in todo else None
    return Checked(inputs, deepspeed, suite)


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


def made_from(cfg: RunConfig, name: str, inputs: RunInputs) -> dict:
    """What a phase's checkpoints depend on, flat and comparable: `--resume` refuses a checkpoint made from
    anything else (another corpus, tokenizer, learning rate, block length, ...)."""
    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()[:16]

    record = {
        "method": cfg.method,
        "baseline": str(inputs.baseline),
        "target corpus": digest(inputs.forget_ids().numpy().tobytes()),
        "tokenizer": digest(json.dumps(sorted(inputs.tokenizer.get_vocab().items())).encode()),
        "anchors": digest(json.dumps(inputs.anchors.terms, sort_keys=True).encode()) if inputs.anchors else "",
        "retain corpus": digest(json.dumps([block.input_ids for block in inputs.retain_blocks]).encode()) if inputs.retain_blocks else "",
        "dtype": cfg.dtype,
        "engine.workers": cfg.engine.workers,
    }
    labels = {key: value for key, value in asdict(cfg.labels).items() if key not in ("impl", "batch_size")}  # neither changes a label
    section = method_class(cfg.method).train_sections.get(name, "")  # the phase's TrainConfig (exports have none)
    training = asdict(getattr(cfg, section)) if section else {}
    for section, values in ((section, training), ("labels", labels), ("loss", asdict(cfg.loss)), ("memorization", asdict(cfg.memorization)), ("offset", asdict(cfg.offset))):
        record.update({f"{section}.{key}": value for key, value in values.items()})
    return record


def train_phase(cfg: RunConfig, run: RunDir, method: Method, name: str, checked: Checked, runner: Runner, resume: bool) -> tuple[PhaseResult, TrainingSummary | None]:
    """One training phase of the method on the runner; its model is published atomically (RUN/unlearned with
    the method's summary, which is returned too)."""
    phase = method.phase(name, checked.inputs)
    if not (resume and latest_checkpoint(run.checkpoints(name))):
        shutil.rmtree(run.checkpoints(name), ignore_errors=True)  # an earlier crash's, now stale
        record_inputs(run.checkpoints(name), made_from(cfg, name, checked.inputs))
    job = TrainJob(
        phase=name,
        init=phase.init,
        train=phase.train,
        input_ids=phase.examples if phase.examples is not None else checked.inputs.forget_ids(),
        objective=phase.objective,
        teacher=phase.teacher,
        save_to=run.staging(name, clear=not resume),
        keep_best=phase.keep_best,
        checkpoint_dir=run.checkpoints(name),
        checkpoint_every=cfg.engine.checkpoint_every,
        tb_dir=run.root / "tb" / name,
        dtype=cfg.dtype,
        device=cfg.device,
        deepspeed=checked.deepspeed,
        selection=phase.selection,
        task_arithmetic=phase.task_arithmetic,
        reference=phase.reference,
        offset=phase.offset,
        frozen_zero=inference_zero(checked.deepspeed),
    )
    result = runner.train(job, resume)
    if result.fit.memorization:  # a memorization-aware phase: how its selection and stop went
        step, mean, selected = result.fit.memorization[-1]
        ended = "stopped below" if result.fit.stopped_early else "ended above"
        log.info("%s: mean memorization %.3f at step %d (%d blocks selected), %s the stop level %.3f", name, mean, step, selected, ended, result.fit.stop_level)
    summary = method.summary(result) if name == "unlearn" else None
    if summary is not None:
        (job.save_to / TRAINING_SUMMARY).write_text(json.dumps(summary.as_json(), indent=2) + "\n")
    run.publish(name)
    if not cfg.engine.keep_checkpoints:
        shutil.rmtree(run.checkpoints(name), ignore_errors=True)
        record_path(run.checkpoints(name)).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when no other phase keeps its checkpoints there
            run.checkpoints(name).parent.rmdir()
    return result, summary


def describe(name: str, summary: dict) -> str:
    """The report line of a trained model, by the method that made it (summaries before `method` were WHP's)."""
    return METHODS[summary.get("method", "whp")].describe(name, summary)


def evaluate(cfg: RunConfig, run: RunDir, models: dict[str, Path], device: torch.device, title: str, checked: Checked, made: dict[str, dict], runner: Runner) -> dict:
    """The evaluation suite for each model on `runner`'s ranks (in this process with the local runner or
    `eval.in_process`), the attacks on each unlearned model here, then each model against the oracle; the
    report. `made`: the summaries of models this process trained (in memory); those of models made earlier
    are read from their directories."""
    terms = anchor_terms(checked.inputs.anchors)
    tokenizers = {name: load_tokenizer(path, name) for name, path in models.items()}
    jobs = [EvalJob(name, Path(path), workload(tokenizers[name], cfg.eval, checked.suite)) for name, path in models.items()]
    log.info("evaluating %s", ", ".join(f"{name} ({path})" for name, path in models.items()))
    placement = LocalRunner() if cfg.eval.in_process else runner
    measured = placement.on_ranks(measure_models, jobs, cfg.eval, cfg.device, cfg.dtype, inference_zero(checked.deepspeed), what="evaluation")
    results, attacked = {}, {}
    attack_eval = dataclasses.replace(cfg.eval, perturbations=0)  # recovery does not read the perturbation attack's AUC
    for index, job in enumerate(jobs):
        results[job.name] = combine(job.work, [rank[index] for rank in measured], tokenizers[job.name], cfg.eval, checked.suite, terms)
        if job.name in ("baseline", "oracle") or not cfg.eval.attacks:
            continue
        model = load_model(job.path, job.name, device, torch_dtype(cfg.dtype, device)).eval()  # whole, here: see docs/engine.md
        for attack in cfg.eval.attacks:
            for label, attacked_model in attacked_models(model, tokenizers[job.name], attack, cfg.eval, checked.suite.forget):
                log.info("evaluating %s after the %s attack", job.name, label)
                attacked[f"{job.name} ({label})"] = job.name
                results[f"{job.name} ({label})"] = evaluate_model(attacked_model, tokenizers[job.name], attack_eval, terms, checked.suite)
    compare_to_oracle(results)
    recovered = {name: recovery(results[name], results[of], results["baseline"]) for name, of in attacked.items() if "baseline" in results}
    with SummaryWriter(str(run.root / "tb" / "eval")) as writer:
        for name, result in results.items():
            for metric, value in result.items():
                if isinstance(value, (int, float)):
                    writer.add_scalar(f"{name}/{metric}", value, 0)
    summaries = {name: made.get(name) or json.loads((Path(path) / TRAINING_SUMMARY).read_text()) for name, path in models.items() if name in made or (Path(path) / TRAINING_SUMMARY).is_file()}
    notes = [describe(name, summary) for name, summary in summaries.items() if name != "baseline"]
    notes += [describe_recovery(name, found) for name, found in recovered.items()]
    write_report(run.root, results, title=title, notes=notes, extra={"training": summaries, "attack_recovery": recovered})
    print(format_table(results))
    print(f"\nreport: {run.root / 'report.md'}")
    return results


def _models_to_evaluate(cfg: RunConfig, run: RunDir, checked: Checked, given: dict[str, Path] | None, todo: list[str]) -> dict[str, Path]:
    """The models the eval phase compares, each checked now (weights, tokenizer) unless this command makes it."""
    models = dict(given or {"baseline": checked.inputs.baseline, "unlearned": run.outputs["unlearn"]})
    if cfg.oracle and "oracle" not in models:
        models["oracle"] = Path(cfg.oracle).expanduser()
    made_here = {run.outputs[phase] for phase in todo if phase != "eval"}
    for name, path in models.items():
        if path is None:
            raise UserError(f"no {name} model to evaluate (use --{name} or set it in the config)")
        if Path(path) not in made_here:
            check_model_dir(path, name)
            check_tokenizer_fits(load_tokenizer(path, name), Path(path).expanduser(), name)
    return models


def run(cfg: RunConfig, phases: list[str], overwrite: bool, command: str, eval_models: dict[str, Path] | None = None, title: str = "obliviate run", runner: Runner | None = None, resume: bool = False, made: dict[str, TrainingSummary | None] | None = None) -> RunResult:
    """Run the given phases in order with `runner` (default: in this process); `eval_models` overrides which
    models the eval phase compares, `made` hands it the summaries of those an earlier call trained. With
    `resume`, finished phases are kept and an interrupted one continues."""
    method = method_class(cfg.method)(cfg)
    known = {*method.outputs, "unlearn", "eval"}
    for phase in phases:
        if phase not in known:
            raise UserError(f"method {cfg.method} has no {phase} phase (it has: {', '.join(sorted(known))})")
    directory = run_dir(cfg)
    todo = directory.claim(phases, overwrite, resume)
    checked = check_inputs(cfg, directory, method, todo)
    for phase in todo if resume else ():
        if phase not in ("eval", *method.exports):
            check_resumable(directory.checkpoints(phase), made_from(cfg, phase, checked.inputs))
    device = pick_device(cfg.device)
    models = _models_to_evaluate(cfg, directory, checked, eval_models, todo) if "eval" in todo else {}
    result = RunResult({}, None, None)
    with directory.opened(cfg, command, trains=any(phase not in ("eval", *method.exports) for phase in todo), resume=resume):
        for phase in todo:
            if phase in method.exports:
                method.export(phase, checked.inputs, directory.staging(phase), device)
                directory.publish(phase)
            elif phase != "eval":
                result.phases[phase], summary = train_phase(cfg, directory, method, phase, checked, runner or LocalRunner(), resume)
                result.summary = summary or result.summary
        if "eval" in todo:
            made = {**(made or {}), **({"unlearned": result.summary} if not eval_models else {})}
            result.metrics = evaluate(cfg, directory, models, device, title, checked, {name: s.as_json() for name, s in made.items() if s}, runner or LocalRunner())
    return result
