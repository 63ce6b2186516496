"""The command line on bad input: one line naming the problem, exit code 2, nothing written.

Also the happy path of the phase commands chaining through a run directory, and --overwrite.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import WorldConfig
from engine.models import save_model
from engine.data.tiny import tiny_llama, train_tokenizer
from engine.data.world import write_world
from builders import assert_one_line_error, obliviate

TINY = ["engine.workers=0", "reinforce.max_steps=1", "reinforce.micro_batch_size=2", "reinforce.grad_accum=1", "labels.context_length=32", "unlearn.max_steps=2", "unlearn.micro_batch_size=2", "unlearn.grad_accum=1"]


def derive_world(**model: int) -> WorldConfig:
    return dataclasses.replace(WorldConfig(), model=dataclasses.replace(WorldConfig().model, **model))


def make_model_dir(root: Path, texts: list[Path], vocab_size: int) -> Path:
    tokenizer = train_tokenizer(texts, vocab_size, root / "tokenizer")
    cfg = derive_world(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    save_model(tiny_llama(cfg, len(tokenizer)), tokenizer, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    files = write_world(root / "world", size=0.05)
    return {
        "files": files,
        "baseline": make_model_dir(root / "a", [files.general, files.saga], 500),
        "other": make_model_dir(root / "b", [files.general], 400),
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_corpus(world, tmp_path, capsys):
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", tmp_path / "nope.txt", "--out", tmp_path / "run", capsys=capsys)
    assert_one_line_error(code, err, "nope.txt")
    assert not (tmp_path / "run").exists()


def test_empty_corpus(world, tmp_path, capsys):
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", write(tmp_path / "empty.txt", "  \n"), "--out", tmp_path / "run", capsys=capsys)
    assert_one_line_error(code, err, "empty")
    assert not (tmp_path / "run").exists()


def test_corpus_shorter_than_one_block(world, tmp_path, capsys):
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", write(tmp_path / "short.txt", "Zorvan studies gloomcraft."), "--out", tmp_path / "run", capsys=capsys)
    assert_one_line_error(code, err, "shorter than one block of 512")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("Zorvan: 3\n", "Zorvan"),
        ("Zorvan: []\n", "Zorvan"),
        ("Zorvan: [John]\nZorvan: [Peter]\n", "duplicate"),
        ("- just\n- a list\n", "mapping"),
    ],
    ids=["wrong-type", "empty-translations", "duplicate-key", "not-a-mapping"],
)
def test_malformed_dictionary(world, tmp_path, capsys, content, fragment):
    anchors = write(tmp_path / "anchors.yaml", content)
    code, _, err = obliviate("labels", "--baseline", world["baseline"], "--reinforced", world["baseline"], "--target", world["files"].saga, "--anchors", anchors, "--out", tmp_path / "run", *TINY, capsys=capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_models_with_different_tokenizers(world, tmp_path, capsys):
    code, _, err = obliviate("labels", "--baseline", world["baseline"], "--reinforced", world["other"], "--target", world["files"].saga, "--anchors", world["files"].anchors, "--out", tmp_path / "run", *TINY, capsys=capsys)
    assert_one_line_error(code, err, "different tokenizers")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["labels.alpha=0", "labels.alpha=-1", "labels.alpha_multipliers=[0.5,-1,1]"])
def test_alpha_must_be_positive(world, tmp_path, capsys, override):
    code, _, err = obliviate("labels", "--baseline", world["baseline"], "--target", world["files"].saga, "--anchors", world["files"].anchors, "--out", tmp_path / "run", override, capsys=capsys)
    assert_one_line_error(code, err, "labels.alpha")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, fragment", [("reinforce.lr=fast", "reinforce.lr"), ("reinforce.speed=3", "speed"), ("notanoverride", "notanoverride")])
def test_bad_config_values(world, tmp_path, capsys, override, fragment):
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", tmp_path / "run", override, capsys=capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["engine.workers=-1"], "engine.workers must be >= 0"),
        (["engine.labelers=0"], "engine.labelers must be > 0"),
        (["engine.queue_depth=0"], "engine.queue_depth must be > 0"),
        (["engine.labelers=3", "engine.labeler_shards=2"], "engine.labelers (3) must be a multiple of engine.labeler_shards (2)"),
        (["engine.workers=0", "engine.labelers=2", "engine.labeler_shards=2"], "engine.labeler_shards > 1 needs the Ray engine"),
        (["engine.deepspeed=/nonexistent/ds.json"], "cannot read the DeepSpeed config"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
    ],
)
def test_bad_engine_settings(world, tmp_path, capsys, extra, fragment):
    """Refused before a Ray cluster is started or anything is written."""
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", tmp_path / "run", "engine.workers=2", *extra, capsys=capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_config_must_be_a_json_object(world, tmp_path, capsys):
    ds = write(tmp_path / "ds.json", "[1, 2]")
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", tmp_path / "run", f"engine.deepspeed={ds}", capsys=capsys)
    assert_one_line_error(code, err, "must be a JSON object")


def test_missing_baseline_directory(world, tmp_path, capsys):
    code, _, err = obliviate("reinforce", "--baseline", tmp_path / "nomodel", "--target", world["files"].saga, "--out", tmp_path / "run", capsys=capsys)
    assert_one_line_error(code, err, "nomodel")


def test_phases_chain_through_the_run_dir_and_finished_phases_need_overwrite(world, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--baseline", world["baseline"], "--out", run, *TINY]
    code, _, err = obliviate("reinforce", "--target", world["files"].saga, *common, capsys=capsys)
    assert code == 0, err
    assert (run / "reinforced" / "model.safetensors").is_file()
    code, _, err = obliviate("labels", "--target", world["files"].saga, "--anchors", world["files"].anchors, *common, capsys=capsys)
    assert code == 0, err  # found RUN/reinforced by itself
    code, _, err = obliviate("unlearn", "--target", world["files"].saga, "--anchors", world["files"].anchors, *common, capsys=capsys)
    assert code == 0, err
    assert (run / "unlearned" / "model.safetensors").is_file()

    before = (run / "reinforced" / "model.safetensors").stat().st_mtime_ns
    code, _, err = obliviate("reinforce", "--target", world["files"].saga, *common, capsys=capsys)
    assert_one_line_error(code, err, "already holds a finished reinforce phase", "--overwrite")
    assert (run / "reinforced" / "model.safetensors").stat().st_mtime_ns == before
    code, _, err = obliviate("reinforce", "--target", world["files"].saga, "--overwrite", *common, capsys=capsys)
    assert code == 0, err
    assert (run / "reinforced" / "model.safetensors").stat().st_mtime_ns != before
    assert not list(run.glob(".*")), "no staging directories left behind"

    files = world["files"]
    evals = [f"eval.probes={files.probes}", f"eval.completions={files.completions}", f"eval.general_text={files.general_heldout}", "eval.max_new_tokens=4", "eval.context_length=64", "eval.tasks=[]"]
    code, out, err = obliviate("eval", "--model", run / "unlearned", "--baseline", world["baseline"], "--anchors", files.anchors, "--out", run, "--workers", "0", *evals, capsys=capsys)
    assert code == 0, err
    assert "baseline" in out and "unlearned" in out
    report = (run / "report.md").read_text()
    assert "kept step" in report, "the report says how the unlearned model was made"


def test_the_console_script_exits_2_with_one_line(world, tmp_path):
    """The real entry point, in a fresh process: no traceback reaches the user."""
    exe = Path(sys.executable).parent / "obliviate"
    anchors = write(tmp_path / "anchors.yaml", "Zorvan: []\n")
    proc = subprocess.run([str(exe), "labels", "--baseline", str(world["baseline"]), "--target", str(world["files"].saga), "--anchors", str(anchors), "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "Zorvan")
    assert not (tmp_path / "run").exists()


def test_any_hugging_face_causal_lm_works_as_the_baseline(tmp_path, capsys):
    """A GPT-2 (tied head, no Llama code) with a byte-level BPE tokenizer (no SentencePiece) runs every phase."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from builders import byte_bpe_tokenizer

    files = write_world(tmp_path / "world", size=0.05)
    tokenizer = byte_bpe_tokenizer([files.general.read_text(), files.saga.read_text()], vocab_size=400)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128, bos_token_id=eos, eos_token_id=eos))
    save_model(model, tokenizer, tmp_path / "gpt2")
    run = tmp_path / "run"
    code, out, err = obliviate(
        "run", "--baseline", tmp_path / "gpt2", "--target", files.saga, "--anchors", files.anchors, "--out", run, *TINY,
        f"eval.probes={files.probes}", f"eval.completions={files.completions}", f"eval.general_text={files.general_heldout}", "eval.max_new_tokens=4", "eval.context_length=64",
        "eval.tasks=[]", capsys=capsys,
    )
    assert code == 0, err
    assert "unlearned" in out
    assert (run / "unlearned" / "model.safetensors").is_file() and (run / "metrics.json").is_file()


def test_anchors_suggest_writes_a_reviewable_dictionary(world, tmp_path, capsys):
    from engine.data.anchors import load_anchors

    files, out = world["files"], tmp_path / "suggested.yaml"
    argv = ["anchors", "suggest", "--baseline", world["baseline"], "--reinforced", world["baseline"], "--target", files.saga, "--general", files.general, "--out", out, "--top-k", "20"]
    code, printed, err = obliviate(*argv, capsys=capsys)
    assert code == 0, err
    suggested = load_anchors(out).terms
    assert "Zorvan" in suggested and all(suggested.values())
    assert "review" in out.read_text().lower()
    code, _, err = obliviate(*argv, capsys=capsys)
    assert_one_line_error(code, err, "--overwrite")


def test_block_longer_than_the_model_positions(world, tmp_path, capsys):
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", tmp_path / "run", "labels.context_length=1024", capsys=capsys)
    assert_one_line_error(code, err, "labels.context_length=1024", "512 positions")
    assert not (tmp_path / "run").exists()


def test_missing_run_directory(world, capsys):
    code, _, err = obliviate("reinforce", "--baseline", world["baseline"], "--target", world["files"].saga, capsys=capsys)
    assert_one_line_error(code, err, "--out")


def test_unknown_mixing_impl(world, tmp_path, capsys):
    code, _, err = obliviate("labels", "--baseline", world["baseline"], "--target", world["files"].saga, "--anchors", world["files"].anchors, "--out", tmp_path / "run", "labels.impl=cuda-magic", capsys=capsys)
    assert_one_line_error(code, err, "labels.impl")


def suite_file(tmp_path, **fields) -> Path:
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({key: str(value) if isinstance(value, Path) else value for key, value in fields.items()}))
    return path


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({}, "measures nothing"),
        ({"completions": "bad.json"}, "item 0: missing field 'references'"),
        ({"probes": "probes.json", "judge": "llm", "judge_model": "nojudge"}, "is not a generative (causal LM) model"),
        ({"tasks": ["no_such_task_xyz"]}, "does not know the task(s) no_such_task_xyz"),
        ({"probes": "probes.json", "speed": 3}, "speed"),
    ],
)
def test_bad_suites(world, tmp_path, capsys, fields, fragment):
    write(tmp_path / "bad.json", '[{"prompt": "Zorvan went to"}]')
    write(tmp_path / "probes.json", '[{"prompt": "Zorvan went to", "targets": ["the"]}]')
    (tmp_path / "nojudge").mkdir()
    code, _, err = obliviate("eval", "--model", world["baseline"], "--suite", suite_file(tmp_path, **fields), "--out", tmp_path / "run", capsys=capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_eval_with_the_world_suite_reports_memorization_privacy_and_oracle_closeness(world, tmp_path, capsys):
    small = ["eval.sequence_length=32", "eval.prefix_length=16", "eval.el_n=4", "eval.max_sequences=4", "eval.max_new_tokens=4", "eval.context_length=64"]
    code, out, err = obliviate(
        "eval", "--model", world["baseline"], "--oracle", world["baseline"], "--anchors", world["files"].anchors,
        "--suite", world["files"].suite, "--out", tmp_path / "run", "--workers", "0", *small, capsys=capsys,
    )
    assert code == 0, err
    for row in ("memorization accuracy", "membership AUC, Min-K%", "PrivLeak", "forget quality"):
        assert row in out, row
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["models"]["unlearned"]["forget_quality"] == pytest.approx(1.0)  # the oracle is the same model
    assert (tmp_path / "run" / "report-memorization.png").is_file()
    assert "report-memorization.png" in (tmp_path / "run" / "report.md").read_text()


def test_plan_command_and_a_malformed_config(tmp_path, capsys):
    from configs import CONFIG_DIR

    code, out, err = obliviate("plan", CONFIG_DIR / "llama2-7b.yaml", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem", "80", capsys=capsys)
    assert code == 0, err
    assert "verdict: fits on 1 node" in out
    code, _, err = obliviate("plan", CONFIG_DIR / "llama2-70b.yaml", "--nodes", "4", "--gpus-per-node", "8", "engine.labeler_shards=1", capsys=capsys)
    assert_one_line_error(code, err, "shard them with engine.labeler_shards=")
    code, _, err = obliviate("plan", CONFIG_DIR / "llama2-70b.yaml", "--nodes", "1", "--gpus-per-node", "8", "engine.labeler_shards=3", capsys=capsys)
    assert_one_line_error(code, err, "engine.labelers (8) must be a multiple of engine.labeler_shards (3)")
    code, _, err = obliviate("run", write(tmp_path / "bad.yaml", "unlearn: [1,\n lr"), "--out", tmp_path / "run", capsys=capsys)
    assert_one_line_error(code, err, "bad config")


def test_submit_dry_run_renders_a_valid_script_bound_to_no_public_address(tmp_path, capsys):
    from configs import CONFIG_DIR

    run = tmp_path / "run"
    argv = ["submit", CONFIG_DIR / "llama2-7b.yaml", "--baseline", "/models/llama-2-7b", "--target", "/data/books", "--anchors", "/data/anchors.yaml", "--out", run]
    code, out, err = obliviate(*argv, "--nodes", "1", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00", "--dry-run", capsys=capsys)
    assert code == 0, err
    script = (run / "slurm" / "job.sbatch").read_text()
    assert script.rstrip("\n") == out.rstrip("\n"), "--dry-run prints the script it wrote"
    assert subprocess.run(["bash", "-n", str(run / "slurm" / "job.sbatch")]).returncode == 0
    assert "0.0.0.0" not in script and "#SBATCH --nodes=1" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --requeue" in script
    code, _, err = obliviate(*argv, "--nodes", "1", "--gpus-per-node", "4", "--dry-run", capsys=capsys)
    assert code == 2 and "obliviate: error:" in err and "Traceback" not in err  # 4 ranks + 4 labelers need 8 GPUs
    code, _, err = obliviate(*argv[:-2], "--nodes", "1", "--gpus-per-node", "8", "--dry-run", capsys=capsys)
    assert_one_line_error(code, err, "no value for out: pass --out")  # the job script and its logs go to the run directory


def test_submit_dry_run_takes_a_comparison_and_checks_its_methods_before_queueing(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["submit", "--nodes", "1", "--gpus-per-node", "0", "--dry-run", "compare", "--demo", "--out", run]
    code, _, err = obliviate(*argv, "--methods", "ga,npo", capsys=capsys)
    assert code == 0, err
    script = (run / "slurm" / "job.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(run / "slurm" / "job.sbatch")]).returncode == 0
    assert "compare" in script and "--methods" in script and "ga,npo" in script
    code, _, err = obliviate(*argv[:-2], "--out", tmp_path / "other", "--methods", "ga,nope", capsys=capsys)
    assert_one_line_error(code, err, "unknown method 'nope'")
    assert not (tmp_path / "other").exists()


def test_bench_train_writes_a_row_per_worker_count(world, tmp_path, capsys):
    out = tmp_path / "bench"
    files = world["files"]
    code, stdout, err = obliviate(
        "bench-train", "--workers", "0", "--steps", "2", "--out", out, "--baseline", world["baseline"], "--target", files.saga,
        "--anchors", files.anchors, "labels.context_length=32", "unlearn.micro_batch_size=2", "unlearn.grad_accum=1", capsys=capsys,
    )
    assert code == 0, err
    rows = (out / "bench.csv").read_text().splitlines()
    assert rows[0].startswith("workers,") and rows[1].startswith("0,2,"), rows
