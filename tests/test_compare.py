"""`obliviate compare`: the comparison built from hand-made results (missing metrics are null, never a crash),
and one run of two methods on the tiny test world, in process: RUN/<method>/unlearned for each, one evaluation,
comparison.json/.md/.png; --resume keeps everything, and existing outputs are refused before anything trains."""

import json
import math

import pytest

from builders import assert_one_line_error, obliviate
from engine.data.world import write_world
from engine.evaluation.comparison import build_comparison, markdown, plot, results_from_metrics, write_comparison
from test_cli import TINY, make_model_dir

BASELINE = {
    "probability_familiarity": 0.8, "completion_familiarity": 4.0, "perplexity": 3.0,
    "memorization_accuracy": 0.9, "memorized_outliers": 20, "mia_auc_loss": 0.95, "mia_auc_zlib": 0.9, "mia_auc_min_k": 0.96,
    "forget_quality": 1e-10, "details": {"memorization": {"outliers": {"count": 20}}},
}
WHP = {
    "probability_familiarity": 0.2, "completion_familiarity": 0.0, "perplexity": 3.3,
    "memorization_accuracy": 0.6, "mia_auc_loss": 0.7, "mia_auc_min_k": 0.72, "mia_auc_perturbation": 0.66,
    "details": {"memorization": {"outliers": {"count": 3}, "band_outliers": {"count": 5, "low": 0.15, "high": 0.6}}},
}
GA = {"probability_familiarity": 0.0, "perplexity": float("nan"), "details": {}}  # NaN is no number: null
TRAINING = {
    "whp": {"wall_seconds": 12.5, "summary": {"method": "whp", "steps": 4, "train_seconds": 9.0, "throughput": {"tokens_per_s": 1000.0}}},
    "ga": {"wall_seconds": None, "summary": None},
}


def test_rows_hold_what_the_results_hold_and_null_elsewhere():
    comparison = build_comparison({"baseline": BASELINE, "whp": WHP, "ga": GA, "oracle": {"perplexity": 3.6}}, ["whp", "ga"], TRAINING, title="t")
    models = comparison["models"]
    assert list(models) == ["baseline", "whp", "ga", "oracle"]
    assert comparison["methods"] == ["whp", "ga"] and comparison["baseline"] == "baseline" and comparison["oracle"] == "oracle"
    assert [models[name]["role"] for name in models] == ["baseline", "method", "method", "oracle"]
    whp = models["whp"]
    assert whp["probability_familiarity_drop"] == pytest.approx(0.75) and whp["perplexity_rise"] == pytest.approx(0.1)
    assert whp["nll_rise"] == pytest.approx(math.log(3.3) / math.log(3.0) - 1)  # the mean token NLL is log perplexity
    assert whp["outliers"] == 3 and whp["memorization_outliers"] == 5  # the count from details when no flat score
    assert whp["mia_auc_zlib"] is None and whp["mia_auc_perturbation"] == 0.66 and whp["forget_quality"] is None
    assert (whp["wall_seconds"], whp["train_seconds"], whp["steps"], whp["tokens_per_s"]) == (12.5, 9.0, 4, 1000.0)
    ga = models["ga"]
    assert ga["perplexity"] is None and ga["perplexity_rise"] is None and ga["nll_rise"] is None and ga["probability_familiarity_drop"] == pytest.approx(1.0)
    assert ga["outliers"] is None and ga["wall_seconds"] is None and ga["tokens_per_s"] is None
    assert models["baseline"]["outliers"] == 20 and models["baseline"]["wall_seconds"] is None
    assert models["baseline"]["mia_auc_perturbation"] is None  # every row has every AUC any model has
    json.dumps(comparison, allow_nan=False)  # valid JSON: no NaN


def test_nothing_measured_still_builds_every_file(tmp_path):
    comparison = build_comparison({}, ["whp", "ga"], None)
    assert list(comparison["models"]) == ["whp", "ga"] and comparison["baseline"] is None and comparison["oracle"] is None
    assert all(value is None for row in comparison["models"].values() for key, value in row.items() if key != "role")
    write_comparison(tmp_path, comparison)
    assert json.loads((tmp_path / "comparison.json").read_text()) == comparison
    table = (tmp_path / "comparison.md").read_text()
    assert "| whp | – | – |" in table and "comparison.png" in table
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_the_table_formats_changes_counts_and_missing_cells():
    comparison = build_comparison({"baseline": BASELINE, "whp": WHP, "ga": GA}, ["whp", "ga"], TRAINING)
    table = markdown(comparison)
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "AUC Min-K%" in header and "AUC perturbation" in header and "wall s" in header and "tokens/s" in header
    whp = next(line for line in table.splitlines() if line.startswith("| whp |"))
    assert "+75.0%" in whp and "+10.0%" in whp and "| 12.5 |" in whp and "| 1000 |" in whp
    assert plot(comparison)[:4] == b"\x89PNG"


def test_metrics_json_reads_back_into_results():
    metrics = {"models": {"baseline": {"perplexity": 3.0}, "whp": {"perplexity": 3.3}}, "details": {"whp": {"memorization": {"outliers": {"count": 2}}}}}
    results = results_from_metrics(metrics)
    assert results["baseline"] == {"perplexity": 3.0, "details": {}}
    assert build_comparison(results, ["whp"])["models"]["whp"]["outliers"] == 2


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    files = write_world(root / "world", size=0.05)
    return {"root": root, "files": files, "baseline": make_model_dir(root / "a", [files.general, files.saga], 500)}


def _args(world, run, *extra):
    files = world["files"]
    suite = [f"eval.probes={files.probes}", f"eval.general_text={files.general_heldout}", f"eval.forget_set={files.saga}", f"eval.holdout_set={files.saga_heldout}",
             "eval.tasks=[]", "eval.max_new_tokens=4", "eval.sequence_length=32", "eval.prefix_length=16", "eval.el_n=4", "eval.max_sequences=4", "eval.context_length=64"]
    return ["compare", "--baseline", world["baseline"], "--oracle", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", run, *TINY, *suite, *extra]


@pytest.fixture(scope="module")
def compared(world):
    """ga and whp compared on the tiny test world, in process."""
    from launcher.cli import main  # capsys is function-scoped: the module's run calls main directly

    run = world["root"] / "run"
    try:
        main([str(a) for a in _args(world, run, "--methods", "ga,whp")])
    except SystemExit as e:
        assert e.code == 0
    return run


def test_compare_trains_each_method_and_evaluates_once(compared):
    comparison = json.loads((compared / "comparison.json").read_text())
    assert comparison["methods"] == ["ga", "whp"]
    assert list(comparison["models"]) == ["baseline", "ga", "whp", "oracle"]
    for name in ("ga", "whp"):
        assert (compared / name / "unlearned" / "model.safetensors").is_file()
        row = comparison["models"][name]
        assert row["role"] == "method" and row["path"] == str(compared / name / "unlearned")
        assert row["wall_seconds"] > 0 and row["tokens_per_s"] > 0 and row["steps"] == 2
        assert row["probability_familiarity"] is not None and row["perplexity_rise"] is not None and row["mia_auc_min_k"] is not None
        assert row["forget_quality"] is not None  # against the oracle
    assert (compared / "whp" / "reinforced").is_dir() and not (compared / "ga" / "reinforced").exists()
    metrics = json.loads((compared / "metrics.json").read_text())
    assert set(metrics["models"]) == {"baseline", "ga", "whp", "oracle"}
    assert comparison["models"]["baseline"]["perplexity_rise"] == 0.0
    for name in ("comparison.md", "comparison.png", "report.md"):
        assert (compared / name).is_file()
    assert "| whp |" in (compared / "comparison.md").read_text()


def test_resume_keeps_every_finished_method_and_the_evaluation(world, compared, capsys):
    models = {name: (compared / name / "unlearned" / "model.safetensors").read_bytes() for name in ("ga", "whp")}
    metrics = (compared / "metrics.json").read_bytes()
    before = json.loads((compared / "comparison.json").read_text())
    code, out, err = obliviate(*_args(world, compared, "--methods", "ga,whp", "--resume"), capsys=capsys)
    assert code == 0, err
    assert {name: (compared / name / "unlearned" / "model.safetensors").read_bytes() for name in ("ga", "whp")} == models
    assert (compared / "metrics.json").read_bytes() == metrics
    after = json.loads((compared / "comparison.json").read_text())
    assert after == before  # the wall seconds of the kept methods come from the earlier comparison
    assert "| ga |" in out


def test_an_existing_output_of_any_method_refuses_before_anything_trains(world, compared, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "whp" / "unlearned").mkdir(parents=True)  # the second method's output
    code, _, err = obliviate(*_args(world, run, "--methods", "ga,whp"), capsys=capsys)
    assert_one_line_error(code, err, "already holds a finished unlearn phase")
    assert sorted(p.name for p in run.iterdir()) == ["whp"] and not (run / "ga").exists()
    code, _, err = obliviate(*_args(world, compared, "--methods", "ga"), capsys=capsys)  # the finished comparison
    assert_one_line_error(code, err, "--overwrite")


@pytest.mark.parametrize(
    "methods, fragment",
    [("ga,nope", "unknown method 'nope'"), ("", "--methods is empty"), ("ga,,whp", "empty name"), ("ga,whp,ga", "ga more than once"), ("whp,baseline", "not a method")],
    ids=["unknown", "empty", "empty-name", "duplicate", "reserved"],
)
def test_bad_method_lists_are_one_line(world, tmp_path, capsys, methods, fragment):
    code, _, err = obliviate(*_args(world, tmp_path / "run", "--methods", methods), capsys=capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_a_method_whose_inputs_fail_refuses_before_the_first_trains(world, tmp_path, capsys):
    files = world["files"]
    run = tmp_path / "run"
    code, _, err = obliviate("compare", "--baseline", world["baseline"], "--target", files.saga, "--out", run, *TINY, "--methods", "ga,whp", capsys=capsys)
    assert_one_line_error(code, err, "no anchor dictionary")  # whp's, checked before ga trains
    assert not run.exists()
