"""Bad input and faults, table-driven, across the commands: every case ends in exactly one `obliviate: error:`
line naming the problem (exit 2 for input, 1 for a run that could not finish), no traceback, nothing new
in `--out`, and a finished run pointed at with `--overwrite` byte for byte unchanged.

Kinds: non-finite and out-of-range numbers; broken model directories; broken or foreign checkpoints on
`--resume`; output paths that cannot be written; inputs that must be refused (a masked-LM baseline, anchors
that match nothing or map to themselves, a malformed `--time`); usage, YAML and JSON errors in one line.
"""

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from transformers import BertConfig, BertForMaskedLM

from test_cli import TINY, make_model_dir
from engine.data.world import write_world

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    files = write_world(root / "world", size=0.05)
    baseline = make_model_dir(root / "a", [files.general, files.saga], 500)
    return {"root": root, "files": files, "baseline": baseline, "small": make_model_dir(root / "b", [files.general], 400)}


@pytest.fixture(scope="module")
def finished(world):
    """A finished run (reinforce, unlearn, eval) whose files every case below must leave untouched."""
    run, files = world["root"] / "finished", world["files"]
    args = ["run", "--baseline", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", run, *TINY,
            "engine.keep_checkpoints=true", "engine.checkpoint_every=1", f"eval.probes={files.probes}", "eval.tasks=[]", "eval.max_new_tokens=4"]
    code, err = _cli(args)
    assert code == 0, err
    return run


def _cli(argv):
    """The CLI in this process: (exit code, stderr)."""
    from launcher.cli import main

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.log"}


def assert_refused(code, err, expected_code, fragment):
    lines = [line for line in err.splitlines() if line.startswith("obliviate: error:")]
    assert code == expected_code and len(lines) == 1, err
    assert "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ numbers

FLOATS = [f"{phase}.{key}" for phase in ("reinforce", "unlearn") for key in ("lr", "epochs", "weight_decay", "grad_clip", "val_fraction")]
FLOATS += ["eval.relearn_lr", "offset.lr", "offset.alpha", "loss.beta", "loss.retain_weight", "memorization.select_threshold", "memorization.stop_level", "memorization.task_lambda"]
FLOATS += ["labels.alpha", "eval.temperature", "eval.top_p", "eval.min_k", "eval.perturb_fraction", "engine.label_timeout_s", "world.size", "world.pretrain.lr"]
NON_FINITE = [(f"{key}={value}", f"{key} must be a finite number") for key in FLOATS for value in ("nan", "inf", "-inf")]
NON_FINITE += [("labels.alpha_multipliers=[1.0,nan]", "labels.alpha_multipliers must be a finite number")]
NON_FINITE += [("eval.outlier_band=[0.15,nan]", "eval.outlier_band must be a finite number")]
OUT_OF_RANGE = [
    ("unlearn.lr=0", "unlearn.lr must be > 0"),
    ("offset.lr=0", "offset.lr must be > 0"),
    ("reinforce.lr=-1e-5", "reinforce.lr must be > 0"),
    ("unlearn.epochs=0", "unlearn.epochs must be > 0"),
    ("unlearn.micro_batch_size=0", "unlearn.micro_batch_size must be > 0"),
    ("reinforce.grad_accum=-1", "reinforce.grad_accum must be > 0"),
    ("unlearn.max_steps=-3", "unlearn.max_steps must be >= 0"),
    ("unlearn.warmup_steps=-1", "unlearn.warmup_steps must be >= 0"),
    ("unlearn.val_fraction=1.0", "unlearn.val_fraction must be in [0, 1)"),
    ("unlearn.weight_decay=-0.1", "unlearn.weight_decay must be >= 0"),
    ("reinforce.grad_clip=-1", "reinforce.grad_clip must be >= 0"),
    ("labels.alpha=0", "labels.alpha must be > 0"),
    ("labels.alpha_multipliers=[0.5,2.0]", "must contain 1.0"),
    ("labels.context_length=1", "labels.context_length must be >= 2"),
    ("labels.batch_size=0", "labels.batch_size must be > 0"),
    ("labels.impl=fast", "labels.impl must be"),
    ("engine.workers=-1", "engine.workers must be >= 0"),
    ("engine.labelers=0", "engine.labelers must be > 0"),
    ("engine.queue_depth=0", "engine.queue_depth must be > 0"),
    ("engine.labeler_shards=2", "must be a multiple of engine.labeler_shards"),
    ("eval.top_p=1.5", "eval.top_p must be in (0, 1]"),
    ("eval.min_k=0", "eval.min_k must be in (0, 1]"),
    ("eval.batch_size=0", "eval.batch_size must be > 0"),
    ("eval.judge=gpt", "eval.judge must be rule or llm"),
    ("eval.outlier_band=[0.6,0.15]", "eval.outlier_band must be two numbers [low, high] with 0 <= low < high <= 1"),
    ("eval.outlier_band=[0.15]", "eval.outlier_band must be two numbers"),
    ("eval.perturbations=-1", "eval.perturbations must be >= 0"),
    ("eval.attacks=[quant3]", "eval.attacks: unknown attack 'quant3'"),
    ("eval.attacks=[quant4,quant4]", "eval.attacks names an attack twice"),
    ("eval.attacks=[relearn]", "relearn needs eval.forget_set"),
    ("eval.relearn_steps=[0]", "eval.relearn_steps must be step counts >= 1"),
    ("eval.relearn_blocks=0", "eval.relearn_blocks must be > 0"),
    ("eval.perturb_fraction=1.5", "eval.perturb_fraction must be in (0, 1]"),
    ("eval.perturb_span=0", "eval.perturb_span must be > 0"),
    ("world.model.num_heads=3", "must be a multiple of world.model.num_heads"),
    ("world.context_length=1", "world.context_length must be in"),
    ("device=tpu", "device must be auto, cpu or cuda"),
    ("dtype=float16", "dtype must be float32 or bfloat16"),
    ("method=npo2", "unknown method 'npo2'"),
    ("loss.beta=0", "loss.beta must be > 0"),
    ("loss.beta=-0.1", "loss.beta must be > 0"),
    ("loss.gamma=-1", "loss.gamma must be >= 0"),
    ("loss.retain_weight=-1", "loss.retain_weight must be >= 0"),
    ("loss.retain_loss=l2", "loss.retain_loss must be nll, kl or none"),
    ("memorization.select_threshold=1.5", "memorization.select_threshold must be in [0, 1]"),
    ("memorization.stop_level=-0.1", "memorization.stop_level must be in [0, 1]"),
    ("memorization.switch_level=2", "memorization.switch_level must be in [0, 1]"),
    ("memorization.task_lambda=0", "memorization.task_lambda must be > 0"),
    ("memorization.task_lambda=-3", "memorization.task_lambda must be > 0"),
    ("memorization.prefix_length=0", "memorization.prefix_length must be > 0"),
    ("unlearn.lr=fast", "bad config"),
    ("nosuchsection.x=1", "bad config"),
]


@pytest.mark.parametrize("override, fragment", NON_FINITE + OUT_OF_RANGE, ids=[o for o, _ in NON_FINITE + OUT_OF_RANGE])
def test_numbers_are_refused_before_a_finished_run_is_touched(world, finished, override, fragment):
    before = checksums(finished)
    files = world["files"]
    code, err = _cli(["run", "--baseline", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", finished, "--overwrite", *TINY, override])
    assert_refused(code, err, 2, fragment)
    assert checksums(finished) == before


@pytest.mark.parametrize("override", ["labels.alpha=nan", "unlearn.lr=inf", "engine.workers=-2"])
def test_submit_dry_run_writes_no_script_with_bad_numbers(world, tmp_path, override):
    files = world["files"]
    code, err = _cli(["submit", "--nodes", "1", "--gpus-per-node", "0", "--dry-run", "run", "--baseline", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", tmp_path / "run", override])
    assert_refused(code, err, 2, override.split("=")[0])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ models


def _broken_models(world) -> dict[str, Path]:
    root, baseline = world["root"] / "broken", world["baseline"]
    if root.exists():
        return {p.name: p for p in root.iterdir()}
    made = {}

    def copy(name: str) -> Path:
        made[name] = root / name
        shutil.copytree(baseline, made[name])
        return made[name]

    weights = copy("truncated-weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = copy("vocab-mismatch") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 777}))
    (copy("garbage-config") / "config.json").write_text("{not json")
    (copy("list-config") / "config.json").write_text("[1, 2]")
    (copy("no-weights") / "model.safetensors").unlink()
    (copy("garbage-tokenizer") / "tokenizer.json").write_text("garbage")
    for file in copy("no-tokenizer").glob("tokenizer*"):
        file.unlink()
    made["tokenizer-too-large"] = root / "tokenizer-too-large"
    shutil.copytree(world["small"], made["tokenizer-too-large"])
    for file in baseline.glob("tokenizer*"):
        shutil.copy(file, made["tokenizer-too-large"] / file.name)
    made["masked-lm"] = root / "masked-lm"
    BertForMaskedLM(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(made["masked-lm"])
    for file in baseline.glob("tokenizer*"):
        shutil.copy(file, made["masked-lm"] / file.name)
    return made


MODEL_FAULTS = [
    ("truncated-weights", "is truncated"),
    ("vocab-mismatch", "vocab_size 777"),
    ("garbage-config", "config.json is not readable JSON"),
    ("list-config", "config.json is not a JSON object"),
    ("no-weights", "has no weights"),
    ("garbage-tokenizer", "tokenizer"),
    ("no-tokenizer", "tokenizer"),
    ("tokenizer-too-large", "tokenizer has"),
    ("masked-lm", "not a causal language model"),
]


@pytest.mark.parametrize("command", ["reinforce", "unlearn", "run"])
@pytest.mark.parametrize("broken, fragment", MODEL_FAULTS, ids=[b for b, _ in MODEL_FAULTS])
def test_broken_baselines_are_refused_up_front(world, finished, command, broken, fragment):
    model = _broken_models(world)[broken]
    files, before = world["files"], checksums(finished)
    anchors = [] if command == "reinforce" else ["--anchors", files.anchors]
    code, err = _cli([command, "--baseline", model, "--target", files.saga, *anchors, "--out", finished, "--overwrite", *TINY])
    assert_refused(code, err, 2, fragment)
    assert checksums(finished) == before


@pytest.mark.parametrize("broken, fragment", MODEL_FAULTS, ids=[b for b, _ in MODEL_FAULTS])
def test_broken_models_to_evaluate_are_refused(world, tmp_path, broken, fragment):
    code, err = _cli(["eval", "--model", _broken_models(world)[broken], "--out", tmp_path / "run", f"eval.probes={world['files'].probes}", "eval.tasks=[]"])
    assert_refused(code, err, 2, fragment)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def interrupted(world, finished, tmp_path):
    """A copy of the finished run whose unlearn phase is not published: `--resume` continues its checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    os.replace(run / "unlearned", run / ".unlearned.partial")  # the staged best model an interrupted phase keeps
    (run / "metrics.json").unlink()
    return run


def _resume(world, run, *extra):
    files = world["files"]
    return _cli(["unlearn", "--baseline", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", run, "--resume", *TINY, *extra])


def test_the_interrupted_fixture_resumes(world, interrupted):
    code, err = _resume(world, interrupted)
    assert code == 0, err
    assert (interrupted / "unlearned" / "model.safetensors").is_file()


CHECKPOINT_FAULTS = {
    "latest-names-a-missing-step": (lambda c: (c / "latest").write_text("step-99"), "which is no checkpoint"),
    "latest-holds-garbage": (lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00garbage"), "checkpoint"),
    "truncated-loop-state": (lambda c: _truncate(next((c / (c / "latest").read_text()).glob("loop-*.pt"))), "is damaged"),
    "truncated-backend-state": (lambda c: _truncate(c / (c / "latest").read_text() / "backend.pt"), "is damaged"),
    "no-record": (lambda c: c.with_name("unlearn.made-from.json").unlink(), "does not record what its checkpoints were made from"),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_broken_checkpoints_are_refused_on_resume(world, interrupted, fault):
    damage, fragment = CHECKPOINT_FAULTS[fault]
    damage(interrupted / "checkpoints" / "unlearn")
    before = checksums(interrupted)
    code, err = _resume(world, interrupted)
    assert_refused(code, err, 2, fragment)
    assert checksums(interrupted) == before


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["unlearn.lr=1e-3"], "unlearn.lr"),
        (["labels.context_length=24"], "labels.context_length"),
        (["labels.alpha=2.0"], "labels.alpha"),
        (["unlearn.seed=1"], "unlearn.seed"),
        (["dtype=bfloat16"], "dtype"),
        (["method=ga"], "method"),
    ],
    ids=["lr", "context-length", "alpha", "seed", "dtype", "method"],
)
def test_resume_refuses_a_checkpoint_made_from_other_inputs(world, interrupted, extra, fragment):
    before = checksums(interrupted)
    code, err = _resume(world, interrupted, *extra)
    assert_refused(code, err, 2, fragment)
    assert "cannot resume" in err and "made with" in err
    assert checksums(interrupted) == before


def test_resume_refuses_another_target_corpus(world, interrupted, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Zorvan went home early that day. " + world["files"].saga.read_text())
    before = checksums(interrupted)
    code, err = _cli(["unlearn", "--baseline", world["baseline"], "--target", other, "--anchors", world["files"].anchors, "--out", interrupted, "--resume", *TINY])
    assert_refused(code, err, 2, "target corpus")
    assert checksums(interrupted) == before


# ------------------------------------------------------------------------------------------------ paths and I/O


def test_output_paths_that_cannot_be_written(world, tmp_path):
    files = world["files"]
    common = ["reinforce", "--baseline", world["baseline"], "--target", files.saga, *TINY]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, fragment in [(a_file, "exists and is not a directory"), (a_file / "run", "is a file"), ("/proc/obliviate-run", "cannot write the output directory")]:
        code, err = _cli([*common, "--out", out])
        assert_refused(code, err, 2, fragment)
    assert a_file.read_text() == "x"


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_debris(world, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail with EFBIG."""
    files, run = world["files"], tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    argv = [sys.executable, "-c", "from launcher.cli import main; main()", "reinforce", "--baseline", world["baseline"], "--target", files.saga, "--out", run, *TINY]
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, preexec_fn=limit, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert_refused(result.returncode, result.stderr, 1, "")
    assert not (run / "reinforced").exists()
    assert not [p for p in run.rglob("*.tmp")], list(run.rglob("*"))


# ------------------------------------------------------------------------------------------------ inputs to refuse


def test_anchor_dictionaries_that_cannot_work(world, tmp_path):
    files = world["files"]
    common = ["unlearn", "--baseline", world["baseline"], "--reinforced", world["baseline"], "--target", files.saga, "--out", tmp_path / "run", *TINY]
    cases = [
        ("nothing.yaml", "Qwertyuiop: [Asdfgh]\n", "none of the 1 anchor terms"),
        ("itself.yaml", "Zorvan: [Zorvan, Peter]\n", "lists itself as a translation"),
        ("binary.yaml", None, "cannot read the anchor dictionary"),
    ]
    for name, text, fragment in cases:
        path = tmp_path / name
        path.write_bytes(b"\xff\xfe\xfa") if text is None else path.write_text(text)
        code, err = _cli([*common, "--anchors", path])
        assert_refused(code, err, 2, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["2 days", "1:2:3:4", "-5", "12h", "1-2-3"])
def test_submit_refuses_a_malformed_time(world, tmp_path, value):
    files = world["files"]
    code, err = _cli(["submit", "--nodes", "1", "--gpus-per-node", "0", "--time", value, "--dry-run", "run", "--baseline", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", tmp_path / "run"])
    assert_refused(code, err, 2, "--time")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing", ["baseline", "target", "anchors"])
def test_submit_checks_the_paths_the_job_will_need_before_queueing(world, tmp_path, missing):
    files = world["files"]
    paths = {"baseline": world["baseline"], "target": files.saga, "anchors": files.anchors, missing: tmp_path / "nope"}
    code, err = _cli(["submit", "--nodes", "1", "--gpus-per-node", "0", "run", *(x for k, v in paths.items() for x in (f"--{k}", v)), "--out", tmp_path / "run"])
    assert_refused(code, err, 2, "nope")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ one line


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["reinforce", "--no-such-flag"], "No such option"),
        (["reinforce", "--workers", "many"], "--workers"),
        (["reinforce", "--out"], "--out"),
        (["no-such-command"], "No such command"),
        (["plan", "configs/llama2-7b.yaml"], "--nodes"),
        (["submit", "--nodes", "0", "--gpus-per-node", "1", "run"], "--nodes"),
    ],
    ids=["unknown-option", "bad-int", "missing-value", "unknown-command", "missing-required", "out-of-range"],
)
def test_usage_errors_are_one_line(argv, fragment):
    code, err = _cli(argv)
    assert_refused(code, err, 2, fragment)
    assert len(err.strip().splitlines()) == 1, err


def test_yaml_and_json_errors_name_the_file_and_line(world, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("unlearn:\n  lr: 1\n bad: [\n")
    code, err = _cli(["reinforce", config, "--out", tmp_path / "run"])
    assert_refused(code, err, 2, f"{config}:3:")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": broken}\n')
    code, err = _cli(["reinforce", "--baseline", world["baseline"], "--target", corpus, "--out", tmp_path / "run", *TINY])
    assert_refused(code, err, 2, f"{corpus}:2:")
    assert "error occurred while generating" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--alphas", "-1,nan"], "--alphas"),
        (["--alphas", "nan"], "--alphas"),
        (["--tokens", "-5"], "--tokens"),
        (["--shape", "llama9"], "--shape"),
        (["--no-such-flag", "1"], "unrecognized"),
        (["--csv", "."], "is a directory"),
    ],
    ids=["negative-and-nan-alphas", "nan-alpha", "negative-tokens", "unknown-shape", "unknown-flag", "csv-directory"],
)
def test_profile_kernel_flags_are_one_line(flags, fragment, tmp_path):
    csv = [] if "--csv" in flags else ["--csv", tmp_path / "k.csv"]
    code, err = _cli(["profile-kernel", "--shape", "64,96", "--tokens", "8", "--plot", "", *csv, *flags])
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "k.csv").exists()


# ------------------------------------------------------------------------------------------------ the other commands


def _other_commands(world, tmp: Path) -> dict[str, tuple[list, str]]:
    b, files = world["baseline"], world["files"]
    t, a = files.saga, files.anchors
    (tmp / "a-file").write_text("x")
    suggest = ["anchors", "suggest", "--reinforced", b, "--target", t, "--general", files.general]
    plan = ["plan", "configs/llama2-7b.yaml", "--nodes", "1", "--gpus-per-node", "8"]
    return {
        "suggest-missing-baseline": ([*suggest, "--baseline", tmp / "nope", "--out", tmp / "s.yaml"], "baseline model not found"),
        "suggest-out-exists": ([*suggest, "--baseline", b, "--out", tmp / "a-file"], "exists; pass --overwrite"),
        "suggest-out-in-missing-dir": ([*suggest, "--baseline", b, "--out", tmp / "no" / "s.yaml"], "existing directory"),
        "suggest-top-k-0": ([*suggest, "--baseline", b, "--out", tmp / "s.yaml", "--top-k", "0"], "--top-k"),
        "suggest-missing-general": (["anchors", "suggest", "--baseline", b, "--reinforced", b, "--target", t, "--general", tmp / "nope.txt", "--out", tmp / "s.yaml"], "corpus not found"),
        "plan-nan": ([*plan, "labels.alpha=nan"], "labels.alpha must be a finite number"),
        "plan-unknown-model": ([*plan, f"baseline={tmp / 'nope'}"], "unknown model"),
        "plan-missing-config": (["plan", tmp / "nope.yaml", "--nodes", "1", "--gpus-per-node", "8"], "config file not found"),
        "plan-gpu-mem-0": ([*plan, "--gpu-mem", "0"], "--gpu-mem"),
        "logs-missing-run": (["logs", tmp / "nope"], "no SLURM logs"),
        "status-bad-job": (["status", "x y"], "neither a SLURM job id"),
        "eval-missing-model": (["eval", "--model", tmp / "nope", "--out", tmp / "run"], "evaluated model not found"),
        "eval-missing-suite": (["eval", "--model", b, "--suite", tmp / "nope.yaml", "--out", tmp / "run"], "suite file not found"),
        "bench-bad-workers": (["bench-train", "--workers", "a", "--out", tmp / "run"], "--workers"),
        "bench-steps-0": (["bench-train", "--steps", "0", "--out", tmp / "run"], "--steps"),
        "demo-nan": (["demo", "labels.alpha=nan", "--out", tmp / "run"], "labels.alpha must be a finite number"),
        "demo-out-is-a-file": (["demo", "--out", tmp / "a-file"], "exists and is not a directory"),
        "labels-triton-without-interpreter": (["labels", "--baseline", b, "--reinforced", b, "--target", t, "--anchors", a, "--out", tmp / "run", "labels.impl=triton", *TINY], "TRITON_INTERPRET"),
        "unlearn-without-reinforced": (["unlearn", "--baseline", b, "--target", t, "--anchors", a, "--out", tmp / "run", *TINY], "reinforced model not found"),
        "missing-deepspeed-json": (["unlearn", "--baseline", b, "--reinforced", b, "--target", t, "--anchors", a, "--out", tmp / "run", "engine.deepspeed=/nope.json", *TINY], "cannot read the DeepSpeed config"),
        "profile-plot-under-a-file": (["profile-kernel", "--shape", "64,96", "--tokens", "8", "--plot", tmp / "a-file" / "x.png", "--csv", tmp / "k.csv"], "is a file"),
        "unknown-method-for-run": (["run", "--baseline", b, "--target", t, "--out", tmp / "run", "method=nope"], "unknown method"),
        "graddiff-without-retain": (["unlearn", "--baseline", b, "--target", t, "--out", tmp / "run", "method=graddiff", *TINY], "method graddiff needs a retain set"),
        "npo-without-retain": (["run", "--baseline", b, "--target", t, "--out", tmp / "run", "method=npo", *TINY], "method npo needs a retain set: give retain: (general text the model must keep) or set loss.retain_loss=none"),
        "graddiff-without-retain-term": (["unlearn", "--baseline", b, "--target", t, "--retain", files.general, "--out", tmp / "run", "method=graddiff", "loss.retain_loss=none", *TINY], "method graddiff needs a retain term"),
        "missing-retain": (["unlearn", "--baseline", b, "--target", t, "--retain", tmp / "nope.txt", "--out", tmp / "run", "method=graddiff", *TINY], "corpus not found"),
        "sga-without-stop-level": (["unlearn", "--baseline", b, "--target", t, "--out", tmp / "run", "method=sga", "memorization.prefix_length=8", *TINY], "needs memorization.stop_level or eval.holdout_set"),
        "sga-prefix-too-long": (["unlearn", "--baseline", b, "--target", t, "--out", tmp / "run", "method=sga", *TINY], "memorization.prefix_length (32) must be below labels.context_length (32)"),
        "ta-unlearn-without-ascended": (["unlearn", "--baseline", b, "--target", t, "--out", tmp / "run", "method=ta", "memorization.prefix_length=8", *TINY], "ascended model not found"),
        "compare-unknown-method": (["compare", "--methods", "ga,nope", "--baseline", b, "--target", t, "--anchors", a, "--out", tmp / "run", *TINY], "unknown method 'nope': choose one of"),
        "compare-empty-methods": (["compare", "--methods", "", "--baseline", b, "--target", t, "--anchors", a, "--out", tmp / "run", *TINY], "--methods is empty"),
        "compare-duplicate-methods": (["compare", "--methods", "whp,ga,whp", "--baseline", b, "--target", t, "--anchors", a, "--out", tmp / "run", *TINY], "whp more than once"),
        "compare-demo-out-is-a-file": (["compare", "--demo", "--methods", "ga,whp", "--out", tmp / "a-file"], "exists and is not a directory"),
    }


OTHER = ["suggest-missing-baseline", "suggest-out-exists", "suggest-out-in-missing-dir", "suggest-top-k-0", "suggest-missing-general", "plan-nan", "plan-unknown-model",
         "plan-missing-config", "plan-gpu-mem-0", "logs-missing-run", "status-bad-job", "eval-missing-model", "eval-missing-suite", "bench-bad-workers", "bench-steps-0",
         "demo-nan", "demo-out-is-a-file", "labels-triton-without-interpreter", "unlearn-without-reinforced", "missing-deepspeed-json", "profile-plot-under-a-file",
         "unknown-method-for-run", "graddiff-without-retain", "npo-without-retain", "graddiff-without-retain-term", "missing-retain", "sga-without-stop-level", "sga-prefix-too-long",
         "ta-unlearn-without-ascended", "compare-unknown-method", "compare-empty-methods", "compare-duplicate-methods",
         "compare-demo-out-is-a-file"]


@pytest.mark.parametrize("case", OTHER)
def test_the_other_commands_refuse_bad_input_in_one_line(world, tmp_path, monkeypatch, case):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # `configs/...` as a user in the checkout types it
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv, fragment = _other_commands(world, tmp_path)[case]
    code, err = _cli(argv)
    assert_refused(code, err, 2, fragment)
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "s.yaml").exists() and (tmp_path / "a-file").read_text() == "x"


def test_a_later_command_never_rewrites_the_finished_runs_record(world, finished):
    record = (finished / "config.yaml").read_bytes()
    models = checksums(finished / "unlearned")
    code, err = _cli(["eval", "--model", finished / "unlearned", "--out", finished, "--overwrite", "--workers", "0", f"eval.probes={world['files'].probes}", "eval.tasks=[]", "eval.max_new_tokens=4"])
    assert code == 0, err
    assert (finished / "config.yaml").read_bytes() == record and (finished / "config-eval.yaml").is_file()
    assert checksums(finished / "unlearned") == models


# ------------------------------------------------------------------------------------------------ signals


def _spawn(world, run: Path, *extra) -> subprocess.Popen:
    files = world["files"]
    argv = [sys.executable, "-c", "from launcher.cli import main; main()", "reinforce", "--baseline", world["baseline"], "--target", files.saga, "--out", run, *TINY, *extra]
    return subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def test_ctrl_c_during_start_up_is_one_line_and_writes_nothing(world, tmp_path):
    run = tmp_path / "run"
    process = _spawn(world, run)
    time.sleep(1.0)  # importing the libraries or checking the inputs
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "obliviate: interrupted", err
    assert not run.exists()


def test_ctrl_c_mid_step_checkpoints_and_resume_finishes(world, tmp_path):
    run = tmp_path / "run"
    process = _spawn(world, run, "reinforce.max_steps=200", "engine.checkpoint_every=1")
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "reinforce" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("obliviate:")]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err, err
    assert not (run / "reinforced").exists()
    code, err = _cli(["reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", run, "--resume", *TINY, "reinforce.max_steps=200", "engine.checkpoint_every=1"])
    assert code == 0, err
    assert (run / "reinforced" / "model.safetensors").is_file()


def test_a_process_killed_while_saving_a_checkpoint_resumes_from_the_last_whole_one(world, tmp_path):
    """SIGKILL as soon as a checkpoint is being written (a `step-K.partial` folder exists): `latest` still names
    a whole checkpoint, and `--resume` finishes."""
    run = tmp_path / "run"
    process = _spawn(world, run, "reinforce.max_steps=200", "engine.checkpoint_every=1")
    root, deadline = run / "checkpoints" / "reinforce", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (root / "latest").exists() and any(root.glob("step-*.partial")):
            break
        time.sleep(0.005)
    process.kill()
    process.communicate(timeout=60)
    assert not (run / "reinforced").exists()
    code, err = _cli(["reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", run, "--resume", *TINY, "reinforce.max_steps=200", "engine.checkpoint_every=1"])
    assert code == 0, err
    assert (run / "reinforced" / "model.safetensors").is_file() and not list(root.parent.glob("*.partial"))
