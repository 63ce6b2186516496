"""The run's report: files, parsable metrics, the numbers in the tables, relative changes."""

import json

import pytest

from engine.evaluation.report import format_table, write_report


def model_result(prob, completion, ppl, completion_text):
    sample = {
        "prompt": "Harry went to",
        "completion": completion_text,
        "grade": 3 if "Hogwarts" in completion_text else 0,
        "revealed": ["Hogwarts"] if "Hogwarts" in completion_text else [],
    }
    return {
        "probability_familiarity": prob,
        "completion_familiarity": completion,
        "perplexity": ppl,
        "details": {
            "probability_familiarity": {"score": prob, "per_probe": [{"prompt": "p", "mass": prob, "top": [("a", 0.5)]}]},
            "completion_familiarity": {"score": completion, "grades": {0: 1, 1: 0, 2: 0, 3: 0}, "samples": [sample]},
            "perplexity": {"score": ppl, "file": "general.txt"},
        },
    }


@pytest.fixture
def results():
    return {
        "baseline": model_result(0.25, 2.5, 12.5, " Hogwarts with Ron"),
        "unlearned": model_result(0.05, 0.0, 13.75, " the market\nto buy `bread`"),
        "oracle": model_result(0.0, 0.0, 13.0, ""),
    }


def test_write_report_writes_parsable_metrics_and_relative_changes(tmp_path, results):
    write_report(tmp_path, results, "Tiny world", notes=["alpha = 5"], extra={"steps": 12})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md", "report.png"]  # no tmp left
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["schema_version"] == 2 and metrics["title"] == "Tiny world" and metrics["extra"] == {"steps": 12}
    assert list(metrics["models"]) == ["baseline", "unlearned", "oracle"]
    assert metrics["models"]["unlearned"] == {"probability_familiarity": 0.05, "completion_familiarity": 0.0, "perplexity": 13.75}
    assert metrics["changes"] == pytest.approx({"probability_familiarity": -0.8, "completion_familiarity": -1.0, "perplexity": 0.1})
    assert metrics["details"]["baseline"]["completion_familiarity"]["samples"][0]["revealed"] == ["Hogwarts"]
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_md_has_table_notes_samples_and_plot(tmp_path, results):
    write_report(tmp_path, results, "Tiny world", notes=["alpha = 5", "seed 0"])
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# Tiny world\n")
    assert "| metric | baseline | unlearned | oracle | change vs baseline |" in markdown
    assert "| 0.25 | 0.05 | 0 | -80.0% |" in markdown and "| 12.5 | 13.75 | 13 | +10.0% |" in markdown
    assert "- alpha = 5\n- seed 0\n" in markdown
    assert "- baseline (grade 3, reveals Hogwarts): ` Hogwarts with Ron`" in markdown
    assert "- unlearned (grade 0): ` the market ⏎ to buy 'bread'`" in markdown  # one line, no stray backticks
    assert "- oracle (grade 0): *(empty)*" in markdown
    assert "![](report.png)" in markdown


def test_write_report_overwrites_atomically(tmp_path, results):
    write_report(tmp_path, results, "first")
    write_report(tmp_path, results, "second")
    assert json.loads((tmp_path / "metrics.json").read_text())["title"] == "second"
    assert len(list(tmp_path.iterdir())) == 3


def test_format_table_is_aligned_and_handles_missing_values(results):
    results = {"baseline": {**results["baseline"], "perplexity": None}, "unlearned": results["unlearned"]}
    results["baseline"]["completion_familiarity"] = 0.0
    lines = format_table(results).splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["metric", "baseline", "unlearned", "change", "vs", "baseline"]
    prob, completion, ppl = lines[2:]
    assert prob.split()[-3:] == ["0.25", "0.05", "-80.0%"]
    assert completion.split()[-3:] == ["0", "0", "n/a"]  # no relative change from a zero baseline
    assert ppl.split()[-3:] == ["skipped", "13.75", "n/a"]


def test_report_without_baseline_or_samples(tmp_path):
    only = {"unlearned": {"probability_familiarity": 0.1, "completion_familiarity": None, "perplexity": 9.0, "details": {}}}
    write_report(tmp_path, only, "one model")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["changes"] == {"probability_familiarity": None, "completion_familiarity": None, "perplexity": None}
    assert "Sample completions" not in (tmp_path / "report.md").read_text()


def test_benchmark_rows_carry_the_papers_numbers_beside_them(tmp_path):
    results = {name: {"probability_familiarity": 0.1, "completion_familiarity": 0.0, "perplexity": 9.0, "benchmark:arc_easy": acc, "details": {}} for name, acc in (("baseline", 0.5), ("unlearned", 0.45))}
    write_report(tmp_path, results, title="t")
    report = (tmp_path / "report.md").read_text()
    assert "arc_easy accuracy (lm-eval)" in report and "arc_easy 0.744 → 0.724" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["models"]["unlearned"]["benchmark:arc_easy"] == 0.45
    assert metrics["changes"]["benchmark:arc_easy"] == pytest.approx(-0.1)


def test_band_outliers_and_perturbation_auc_get_rows_and_the_band_a_note(tmp_path):
    def result(count, below, above, auc):
        band = {"low": 0.15, "high": 0.6, "count": count, "fraction": count / 32, "below": below, "above": above}
        memorization = {"memorization_accuracy": {"mean": 0.5, "per_sequence": [0.5]}, "band_outliers": band}
        return {"probability_familiarity": 0.1, "completion_familiarity": 0.0, "perplexity": 9.0, "memorization_accuracy": 0.5,
                "memorization_band_outliers": count, "mia_auc_perturbation": auc, "details": {"memorization": memorization}}

    results = {"baseline": result(25, 0, 25, 0.9), "unlearned": result(5, 3, 2, 0.6)}
    write_report(tmp_path, results, title="t")
    report = (tmp_path / "report.md").read_text()
    assert "| forget sequences outside the memorization-accuracy band (count) | 25 | 5 | -80.0% |" in report
    assert "| membership AUC, perturbation (0.5 = looks unseen) | 0.9 | 0.6 | -33.3% |" in report
    assert "baseline [0.15, 0.6]: 0 below, 25 above; unlearned [0.15, 0.6]: 3 below, 2 above" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["models"]["unlearned"]["memorization_band_outliers"] == 5 and metrics["models"]["unlearned"]["mia_auc_perturbation"] == 0.6
    assert metrics["details"]["unlearned"]["memorization"]["band_outliers"]["below"] == 3
    rows = [line.split("  ")[0] for line in format_table(results).splitlines()[2:]]
    assert rows.index("forget sequences outside the memorization-accuracy band (count)") == rows.index("memorization accuracy on the forget set (0-1)") + 1
