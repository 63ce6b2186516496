"""`obliviate`: the command line. Each command = a typed config + overrides → a slice of the recipe.

    obliviate demo                                  # tiny world, end to end on CPU
    obliviate run configs/whp.yaml --baseline DIR --target FILE --anchors FILE --out RUN --workers 8
    obliviate compare configs/whp.yaml --methods whp,ga --baseline DIR --target FILE --anchors FILE --out RUN
    obliviate compare --demo --methods whp,ga --out RUN             # the same on the tiny world
    obliviate bench-real                            # every method on SmolLM2-135M taught Hamlet Act I
    obliviate reinforce --baseline DIR --target FILE --out RUN
    obliviate unlearn   --baseline DIR --target FILE --anchors FILE --out RUN   # uses RUN/reinforced
    obliviate labels    --baseline DIR --target FILE --anchors FILE --out RUN   # export, for inspection
    obliviate eval      --model RUN/unlearned --baseline DIR --oracle DIR --out RUN eval.probes=...
    obliviate anchors suggest --baseline DIR --reinforced DIR --target FILE --general FILE --out anchors.yaml

Positional arguments are an optional YAML config followed by dotted overrides (`unlearn.lr=1e-6`).
Bad input ends with one line on stderr and exit code 2; a run that cannot finish with exit code 1; SIGINT
or SIGTERM with a checkpoint and exit code 128 + signal (continue with `--resume`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from configs import CONFIG_DIR, RunConfig, derive, load_config
from configs.errors import Interrupted, RunFailed, UserError, first_line


def _split_args(args: tuple[str, ...], default_config: Path | None) -> tuple[Path | None, list[str]]:
    config, overrides = default_config, []
    for i, arg in enumerate(args):
        if "=" in arg:
            overrides.append(arg)
        elif i == 0 and arg.endswith((".yaml", ".yml")):
            config = Path(arg)
        else:
            raise UserError(f"unexpected argument {arg!r}: give a .yaml config first, then key=value overrides")
    return config, overrides


def _config(args, default_config: Path | None = None, workers: int | None = None, ray_address: str = "", **flags) -> RunConfig:
    path, overrides = _split_args(args, default_config)
    engine = {"engine.workers": workers, "engine.ray_address": ray_address}
    overrides += [f"{key}={value}" for key, value in engine.items() if value not in (None, "")]
    cfg = load_config(path, overrides, **flags)
    from engine.methods import method_class

    method_class(cfg.method)  # an unknown method fails here, before a job is queued or a file written
    return cfg


def _runner(cfg: RunConfig):
    """Ray workers with DeepSpeed ZeRO-3, or this process for `engine.workers=0`: training and evaluation alike."""
    if cfg.engine.workers == 0:
        from engine.training.runners.local import LocalRunner

        return LocalRunner()
    from engine.training.runners.ray_runner import RayRunner

    return RayRunner(cfg.engine, cfg.device)


def run_options(*names: str):
    """The plain flags for the common paths; each sets the config field of the same name."""
    helps = {
        "baseline": "Hugging Face causal-LM directory to unlearn from",
        "target": "target corpus: .txt, .jsonl/.json with a 'text' field, or a folder of those",
        "anchors": "anchor dictionary (YAML or JSON: term -> [translations])",
        "reinforced": "reinforced model directory (default: RUN/reinforced)",
        "oracle": "a model that never saw the target, for comparison",
        "retain": "retain corpus (formats as --target): general text the model must keep (graddiff; npo/simnpo's retain term)",
    }

    def decorate(fn):
        fn = click.option("--ray-address", default="", help="Ray cluster to use (default: $RAY_ADDRESS, else a local one)")(fn)
        fn = click.option("--workers", type=click.IntRange(min=0), default=None, help="trainer ranks (engine.workers; 0: in this process)")(fn)
        fn = click.option("--resume", is_flag=True, help="keep finished phases, continue an interrupted one from its checkpoint")(fn)
        fn = click.option("--overwrite", is_flag=True, help="replace finished phase outputs in --out")(fn)
        fn = click.option("--out", default="", help="run directory")(fn)
        for name in reversed(names):
            fn = click.option(f"--{name}", default="", help=helps[name])(fn)
        return click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]...")(fn)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Make a Llama-class model forget a body of text ("Who's Harry Potter?" unlearning)."""


@cli.command()
@run_options("baseline", "target", "anchors", "oracle")
def demo(args, overwrite, resume, **flags):
    """The whole method on a generated tiny world, on CPU, in minutes.

    Beside the configured labels it also unlearns with `labels.forbid_anchor_keys` flipped (the anchor keys'
    own tokens forbidden — the default, not in the paper — or not: the paper's labels) and reports both.
    """
    from engine import recipe
    from engine.data.tiny import build_world, use_world

    cfg = _config(args, CONFIG_DIR / "demo.yaml", **flags)
    root = Path(cfg.out).expanduser()
    label_kind = "faithful" if cfg.labels.forbid_anchor_keys else "forbid-keys"  # the variant's labels
    variant = derive(cfg, out=str(root / f"variant-{label_kind}"), reinforced=str(root / "reinforced"), **{"labels.forbid_anchor_keys": not cfg.labels.forbid_anchor_keys})
    recipe.run_dir(cfg).claim(recipe.all_phases(cfg), overwrite, resume)  # refuse a finished run before building anything
    recipe.run_dir(variant).claim(["unlearn"], overwrite, resume)
    world = build_world(cfg.world)
    cfg, variant = use_world(cfg, world), use_world(variant, world)
    with _runner(cfg) as runner:
        configured = recipe.run(cfg, ["reinforce", "unlearn"], overwrite, "demo", runner=runner, resume=resume)
        other = recipe.run(variant, ["unlearn"], overwrite, "demo (variant)", runner=runner, resume=resume)
        variant_name = f"unlearned ({label_kind})"
        models = {"baseline": Path(cfg.baseline), "unlearned": root / "unlearned", variant_name: Path(variant.out) / "unlearned"}
        made = {"unlearned": configured.summary, variant_name: other.summary}
        recipe.run(cfg, ["eval"], overwrite, "demo", eval_models=models, title="obliviate demo: unlearning the tiny saga", runner=runner, resume=resume, made=made)


@cli.command(name="compare")
@click.option("--methods", required=True, help="comma-separated methods to compare, e.g. whp,ga (registered names)")
@click.option("--demo", is_flag=True, help="on the generated tiny world with configs/demo.yaml, like `obliviate demo`")
@click.option("--suite", default="", help="evaluation suite YAML (the `eval` section: files, tasks, judge)")
@run_options("baseline", "target", "anchors", "reinforced", "oracle", "retain")
def compare_command(args, methods, demo, overwrite, resume, out, **flags):
    """Several methods from the same baseline on the same data: each trains into RUN/METHOD on one runner,
    then one evaluation of the baseline, every method and the oracle (RUN/metrics.json, RUN/report.md) and
    the comparison: RUN/comparison.json, .md and .png (forgetting vs damage)."""
    from engine import compare

    names = compare.parse_methods(methods)
    if demo and not out and not any(arg.startswith("out=") for arg in args):
        out = "runs/compare"  # not demo.yaml's runs/demo, whose metrics.json is the demo's
    cfg = _config(args, CONFIG_DIR / "demo.yaml" if demo else None, out=out, **flags)
    plan = compare.claim(cfg, names, overwrite, resume)  # every run directory refused or kept before anything is built
    if demo:
        from engine.data.tiny import build_world, use_world
        from engine.methods import uses_offset_pair

        cfg = use_world(cfg, build_world(cfg.world, small=uses_offset_pair(names) and not cfg.offset.small))
    compare.check(cfg, plan)
    with _runner(cfg) as runner:
        compare.run(cfg, plan, overwrite, resume, runner)


@cli.command(name="run")
@run_options("baseline", "target", "anchors", "reinforced", "oracle", "retain")
def run_command(args, overwrite, resume, **flags):
    """All phases of the method (`method:`, default whp: reinforce — skipped when --reinforced is given —
    and unlearn on generic labels), then eval."""
    from engine import recipe

    cfg = _config(args, **flags)
    with _runner(cfg) as runner:
        recipe.run(cfg, recipe.all_phases(cfg), overwrite, "run", title="obliviate run", runner=runner, resume=resume)


def _phase_command(name: str, help: str, flags: tuple[str, ...]) -> None:
    """Register `obliviate NAME`: one phase of the recipe from flags and a config."""

    def body(args, overwrite, resume, **flag_values):
        from engine import recipe

        cfg = _config(args, **flag_values)
        with _runner(cfg) as runner:
            recipe.run(cfg, [name], overwrite, name, title=f"obliviate {name}", runner=runner, resume=resume)

    cli.command(name=name, help=help)(run_options(*flags)(body))


_phase_command("reinforce", "Fine-tune the baseline further on the target corpus (RUN/reinforced).", ("baseline", "target"))
_phase_command("unlearn", "Fine-tune the baseline on generic labels that a labeler makes from the baseline and RUN/reinforced (or --reinforced) while it trains (RUN/unlearned); other methods (method=...) their own unlearn phase.", ("baseline", "target", "anchors", "reinforced", "retain"))
_phase_command("labels", "Export the generic labels of every block into RUN/labels, for inspection (unlearn makes its own).", ("baseline", "target", "anchors", "reinforced"))


@cli.command(name="eval")
@click.option("--model", "model", required=True, help="model directory to evaluate")
@click.option("--suite", default="", help="evaluation suite YAML (the `eval` section: files, tasks, judge)")
@run_options("baseline", "anchors", "oracle")
def eval_command(args, overwrite, resume, model, **flags):
    """The evaluation suite on a model, beside the baseline and oracle when given: familiarity, perplexity,
    memorization, membership inference, closeness to the oracle, lm-eval benchmarks. On engine.workers Ray
    ranks, each model ZeRO-3-partitioned over them (0: in this process)."""
    from engine import recipe
    from engine.models import check_model_dir

    cfg = _config(args, **flags)
    models = {"unlearned": check_model_dir(model, "evaluated")}
    if cfg.baseline:
        models = {"baseline": check_model_dir(cfg.baseline, "baseline"), **models}
    with _runner(cfg) as runner:
        recipe.run(cfg, ["eval"], overwrite, "eval", eval_models=models, title=f"obliviate eval: {model}", runner=runner, resume=resume)


@cli.group()
def anchors() -> None:
    """Anchor dictionaries."""


@anchors.command(name="suggest")
@click.option("--baseline", required=True, help="baseline model directory")
@click.option("--reinforced", required=True, help="reinforced model directory")
@click.option("--target", required=True, help="target corpus")
@click.option("--general", required=True, help="general corpus to contrast with")
@click.option("--out", required=True, help="YAML file to write")
@click.option("--top-k", default=200, show_default=True, type=click.IntRange(min=1), help="number of terms to propose")
@click.option("--overwrite", is_flag=True, help="replace an existing file")
def anchors_suggest(baseline, reinforced, target, general, out, top_k, overwrite):
    """Propose a reviewable anchor dictionary from the corpora and the two models, offline."""
    from engine.data.anchors import suggest_anchors, write_suggestions
    from engine.data.corpus import read_corpus
    from engine.models import check_model_dir, check_same_tokenizer, load_model, load_tokenizer, pick_device

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: give a file in an existing directory")
    baseline, reinforced = check_model_dir(baseline, "baseline"), check_model_dir(reinforced, "reinforced")
    tokenizer = load_tokenizer(baseline, "baseline")
    check_same_tokenizer(tokenizer, load_tokenizer(reinforced, "reinforced"), ("baseline", "reinforced"))
    target_docs, general_docs = read_corpus(target), read_corpus(general)
    device = pick_device("auto")
    suggestions = suggest_anchors(target_docs, general_docs, tokenizer, load_model(baseline, "baseline", device).eval(), load_model(reinforced, "reinforced", device).eval(), top_k=top_k)
    if not suggestions:
        raise UserError(f"no term of {target} is over-represented against {general}: nothing to suggest")
    write_suggestions(suggestions, out)
    click.echo(f"wrote {len(suggestions)} suggested anchors to {out}: review them before use")


@cli.command(name="bench-train")
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]...")
@click.option("--workers", "worker_counts", default="1,2", show_default=True, help="comma-separated worker counts to compare (0: in process)")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="optimizer steps per run")
@click.option("--out", default="runs/bench-train", show_default=True, help="directory for the runs and bench.csv")
@click.option("--baseline", default="", help="model to train (default: the config's tiny world)")
@click.option("--target", default="", help="target corpus (default: the tiny world's saga)")
@click.option("--anchors", default="", help="anchor dictionary (default: the tiny world's)")
@click.option("--reinforced", default="", help="reinforced model (default: the baseline itself; labeling costs the same)")
def bench_train(args, worker_counts, steps, out, **flags):
    """Unlearn-phase throughput per worker count: tokens/s, label-wait fraction, labeler use, MFU on GPU."""
    from engine.data.tiny import build_world, use_world
    from launcher.bench import bench_train as run_bench
    from launcher.bench import format_rows, write_csv

    try:
        counts = [int(n) for n in worker_counts.split(",")]
    except ValueError:
        raise UserError(f"--workers {worker_counts!r}: give comma-separated integers like 1,2") from None
    if not counts or min(counts) < 0:
        raise UserError(f"--workers {worker_counts!r}: worker counts must be >= 0")
    cfg = _config(args, CONFIG_DIR / "demo.yaml", out=out, **flags)
    cfg = derive(cfg, **{"unlearn.max_steps": steps, "unlearn.val_fraction": 0.0, "unlearn.epochs": 1e6})
    if not cfg.baseline:
        cfg = use_world(cfg, build_world(cfg.world))
    cfg = derive(cfg, reinforced=cfg.reinforced or cfg.baseline)
    rows = run_bench(cfg, counts, Path(out), _runner)
    click.echo(format_rows(rows))
    write_csv(rows, Path(out) / "bench.csv")
    click.echo(f"\nwrote {Path(out) / 'bench.csv'}")


@cli.command(name="bench-real")
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]...")
@click.option("--runs", default="", help="comma-separated runs of launcher/bench_real.py RUNS (default: all)")
@click.option("--out", default="runs/bench-real", show_default=True, help="run directory")
@click.option("--overwrite", is_flag=True, help="replace finished runs in --out")
@click.option("--resume", is_flag=True, help="keep finished runs, continue an interrupted one")
def bench_real_command(args, runs, out, overwrite, resume):
    """The methods on a real model: SmolLM2-135M-Instruct (from PyPI) taught Hamlet Act I, then unlearned by
    every run, evaluated with the attacks; RUN/bench-real.md and .png. Slow: about an hour on 2 cores once
    the taught model is cached (teaching it the first time takes longer)."""
    import time

    from launcher.bench_real import run_bench, select_runs, write_bench

    chosen = select_runs(runs)
    cfg = _config(args, CONFIG_DIR / "bench-hamlet.yaml", out=out)
    start = time.perf_counter()
    comparison, cfg = run_bench(cfg, chosen, overwrite, resume, _runner)
    click.echo("\n" + write_bench(Path(cfg.out).expanduser(), comparison, time.perf_counter() - start))


@cli.command(name="plan")
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--nodes", type=click.IntRange(min=1), required=True, help="nodes to plan for")
@click.option("--gpus-per-node", type=click.IntRange(min=1), required=True, help="GPUs per node")
@click.option("--gpu-mem", type=click.FloatRange(min=1), default=80.0, show_default=True, help="GiB per GPU")
def plan_command(config, overrides, nodes, gpus_per_node, gpu_mem):
    """Per-GPU memory of trainers and labelers for a config, whether it fits, the smallest node count
    that does, offload options; from config.json shapes (or a built-in Llama table), no weights loaded."""
    from launcher.plan import main_plan

    click.echo(main_plan(config, nodes, gpus_per_node, gpu_mem, list(overrides)))


@cli.command(name="submit", context_settings={"ignore_unknown_options": True})
@click.option("--nodes", type=click.IntRange(min=1), required=True, help="nodes to allocate: one Ray node each, the head on the first")
@click.option("--gpus-per-node", type=click.IntRange(min=0), required=True, help="GPUs per node (0: a CPU job)")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, help="CPUs per node for Ray (otherwise SLURM gives one; or --sbatch=--exclusive)")
@click.option("--partition", default=None, help="SLURM partition")
@click.option("--time", "time_limit", default=None, help="time limit, e.g. 2-00:00:00 (the job checkpoints and requeues 120 s before it)")
@click.option("--account", default=None, help="SLURM account")
@click.option("--job-name", default="obliviate", show_default=True, help="SLURM job name")
@click.option("--sbatch", "extra_sbatch", multiple=True, metavar="OPTION", help="one more #SBATCH line, e.g. --sbatch=--constraint=h100 (repeatable)")
@click.option("--dry-run", is_flag=True, help="write RUN/slurm/job.sbatch and print it; submit nothing")
@click.option("--wait", is_flag=True, help="block until the job ends (requeues included) and exit with its exit code")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[COMMAND] [CONFIG.yaml] [ARGS]...")
def submit_command(command, nodes, gpus_per_node, cpus_per_task, partition, time_limit, account, job_name, extra_sbatch, dry_run, wait):
    """Run an obliviate command as a SLURM batch job: a Ray cluster over the nodes (head on the first), the
    command against it. COMMAND: run (the default), reinforce, unlearn, demo, compare; its own flags follow."""
    from launcher import slurm

    argv = slurm.normalize_command(command)
    slurm.check_command(argv)
    ctx = click.get_current_context()
    sub = cli.get_command(ctx, argv[0])
    with sub.make_context(argv[0], list(argv[1:]), parent=ctx) as sub_ctx:  # bad flags or config fail now, not in the queue
        params = dict(sub_ctx.params)
    params.pop("overwrite", None)
    params.pop("resume", None)
    on_world = argv[0] == "demo" or params.pop("demo", False)  # compare --demo
    if argv[0] == "compare":
        from engine import compare

        compare.parse_methods(params.pop("methods"))  # bad method names fail now, not in the queue
        params["suite"] = params.pop("suite") or None
    cfg = _config(params.pop("args"), CONFIG_DIR / "demo.yaml" if on_world else None, **params)
    slurm.check_fits(argv[0], cfg.engine.workers, cfg.engine.labelers, nodes, gpus_per_node)
    if not dry_run:  # a dry run may write the script for a cluster whose paths this machine does not have
        from engine.recipe import check_paths

        check_paths(cfg, needed=() if on_world else ("baseline", "target"))  # a missing file fails now, not in the queue
    run_dir = Path(cfg.out)
    script = slurm.render(argv, nodes, gpus_per_node, partition, time_limit, account, job_name, extra_sbatch, cpus_per_task=cpus_per_task, run_dir=run_dir)
    follow = f"follow it with: obliviate status {run_dir}; obliviate logs {run_dir}"
    if dry_run:
        click.echo(slurm.submit(script, run_dir, dry_run=True))
        click.echo(f"wrote {run_dir / 'slurm' / 'job.sbatch'}: submit it with sbatch", err=True)
    elif wait:
        def queued(job_id: str) -> None:
            click.echo(f"submitted job {job_id}, waiting for it to end; {follow}")

        code = slurm.submit_and_wait(script, run_dir, queued)
        click.echo(f"the job ended with exit code {code}", err=True)
        sys.exit(code)
    else:
        click.echo(f"submitted job {slurm.submit(script, run_dir, dry_run=False)}; {follow}")


@cli.command(name="status")
@click.argument("job")
def status_command(job):
    """A submitted job's state (JOB: a job id, or a run directory for its latest job): squeue, else sacct."""
    from launcher.slurm import status

    click.echo(status(job))


@cli.command(name="logs")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--job", "job_id", default=None, help="job id (default: the newest in RUN/slurm-logs)")
@click.option("--lines", "-n", type=click.IntRange(min=0), default=100, show_default=True, help="last lines of each file (0: all)")
def logs_command(run, job_id, lines):
    """The tail of a job's stdout and stderr from RUN/slurm-logs."""
    from launcher.slurm import logs

    click.echo(logs(run, job_id, lines))


@cli.command(name="profile-kernel", add_help_option=False, context_settings={"ignore_unknown_options": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def profile_kernel(argv):
    """Time the label kernel per impl, shape and N: ms, TFLOP/s, % peak, memory (--help for flags)."""
    from kernels.profile import main as profile_main

    profile_main(list(argv), prog="obliviate profile-kernel")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not Path("/dev/nvidiactl").exists():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns on every import
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor loading bars drown the phase bars
    datasets.disable_progress_bars()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries when offline are not ours to report
    for name in ("transformers", "datasets", "urllib3", "filelock", "matplotlib", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    try:
        _quiet_libraries()  # seconds of imports: a Ctrl-C here is an interruption like any other
        cli.main(args=argv, prog_name="obliviate", standalone_mode=False)
    except UserError as e:
        click.echo(f"obliviate: error: {e}", err=True)
        sys.exit(2)
    except RunFailed as e:
        click.echo(f"obliviate: error: {e}", err=True)
        sys.exit(1)
    except Interrupted as e:
        click.echo(f"obliviate: {e}", err=True)
        sys.exit(128 + e.signum)
    except click.exceptions.Abort:
        click.echo("obliviate: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: one line, like every other bad input (--help shows usage)
        click.echo(f"obliviate: error: {first_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("obliviate: interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # an I/O fault mid-run (disk full, a file that vanished): one line, the run's outputs stay whole
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"obliviate: error: {e.strerror or first_line(e)}{where}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
