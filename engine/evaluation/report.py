"""The run's report: metrics.json for machines, report.md and report.png for people, a terminal table.

`results` maps a model name ("baseline", "unlearned", "oracle", any subset) to `evaluate_model`'s dict;
its order is the column order. Changes are relative, unlearned vs baseline.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from configs.schema import PAPER_ACCURACY
from engine.evaluation.suite import METRICS

METRIC_LABELS = {
    "probability_familiarity": "probability familiarity (0-1, lower = forgot)",
    "completion_familiarity": "completion familiarity (0-5, lower = forgot)",
    "perplexity": "general-text perplexity (lower = better)",
    "memorization_accuracy": "memorization accuracy on the forget set (0-1)",
    "memorization_band_outliers": "forget sequences outside the memorization-accuracy band (count)",
    "extraction_likelihood": "extraction likelihood EL_n (0-1)",
    "verbatim_rouge": "verbatim memorization, ROUGE-L (0-1)",
    "memorized_outliers": "forget sequences memorized beyond unseen text (count)",
    "mia_auc_loss": "membership AUC, loss (0.5 = looks unseen)",
    "mia_auc_zlib": "membership AUC, zlib (0.5 = looks unseen)",
    "mia_auc_min_k": "membership AUC, Min-K% (0.5 = looks unseen)",
    "mia_auc_perturbation": "membership AUC, perturbation (0.5 = looks unseen)",
    "privleak": "PrivLeak vs oracle (0 = like the oracle)",
    "forget_quality": "forget quality: KS p-value vs oracle (1 = like the oracle)",
}
SCHEMA_VERSION = 2
SAMPLE_COUNT = 3  # sample completions shown in report.md


def write_report(
    run_dir: Path, results: dict[str, dict], title: str, notes: list[str] = (), extra: dict | None = None
) -> None:
    """Write metrics.json, report.png and report.md into run_dir, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = metric_names(results)
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "models": {name: {metric: result.get(metric) for metric in names} for name, result in results.items()},
        "changes": _changes(results),
        "details": {name: result.get("details", {}) for name, result in results.items()},
        "extra": extra,
    }
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str).encode() + b"\n")
    write_atomic(run_dir / "report.png", _plot(results, title))  # before report.md, which embeds them
    figures = ["report.png"]
    if any(isinstance(r.get("details", {}).get("memorization"), dict) for r in results.values()):
        write_atomic(run_dir / "report-memorization.png", _plot_memorization(results))
        figures.append("report-memorization.png")
    relearning = _relearning_curves((extra or {}).get("attack_recovery") or {})
    if relearning:
        write_atomic(run_dir / "report-relearn.png", _plot_relearning(relearning))
        figures.append("report-relearn.png")
    write_atomic(run_dir / "report.md", _markdown(results, title, notes, figures).encode())


RELEARN_COLUMN = re.compile(r"^(?P<model>.+) \(relearn (?P<steps>\d+)\)$")


def _relearning_curves(recovered: dict[str, dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{model: {metric: [(steps, recovery), ...]}} from the relearn attack's columns ("NAME (relearn K)")."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for column, found in recovered.items():
        match = RELEARN_COLUMN.match(column)
        for metric, value in (found.items() if match else ()):
            if value is not None:
                curves.setdefault(match["model"], {}).setdefault(metric, []).append((int(match["steps"]), value))
    return {model: {metric: sorted(points) for metric, points in metrics.items()} for model, metrics in curves.items()}


def _plot_relearning(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    """Recovery toward the baseline against relearning steps: one panel per model, one line per metric."""
    fig = Figure(figsize=(5 * len(curves), 3.6), layout="constrained")
    for ax, (model, metrics) in zip(fig.subplots(1, len(curves), squeeze=False).ravel(), curves.items()):
        for metric, points in metrics.items():
            ax.plot([steps for steps, _ in points], [100 * value for _, value in points], marker="o", label=_label(metric))
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title=f"{model}: relearning", xlabel="fine-tuning steps on held-apart forget text", ylabel="recovery toward the baseline (%)")
        ax.legend(fontsize=6)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def metric_names(results: dict[str, dict]) -> list[str]:
    """The paper's metrics always; the suite's others (memorization, privacy, benchmarks) where measured."""
    measured = {key for result in results.values() for key, value in result.items() if key != "details" and value is not None}
    extra = [key for key in METRIC_LABELS if key not in METRICS and key in measured]
    return [*METRICS, *extra, *sorted(key for key in measured if key.startswith("benchmark:"))]


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric) or f"{metric.removeprefix('benchmark:')} accuracy (lm-eval)"


def format_table(results: dict[str, dict]) -> str:
    """The report's table as aligned plain text, for the terminal."""
    header, rows = _table(results)
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return "  ".join([first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:]))])

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def _changes(results: dict[str, dict]) -> dict[str, float | None]:
    """(unlearned - baseline) / baseline per metric; None where either is missing or the baseline is 0."""
    baseline, unlearned = results.get("baseline", {}), results.get("unlearned", {})
    changes = {}
    for metric in metric_names(results):
        before, after = baseline.get(metric), unlearned.get(metric)
        changes[metric] = None if before is None or after is None or before == 0 else (after - before) / before
    return changes


def _table(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows, one row per metric: the cells both table renderings share."""
    changes = _changes(results)
    header = ["metric", *results, "change vs baseline"]
    rows = [
        [
            _label(metric),
            *(_format_value(result.get(metric)) for result in results.values()),
            "n/a" if changes[metric] is None else f"{changes[metric]:+.1%}",
        ]
        for metric in metric_names(results)
    ]
    return header, rows


def _format_value(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.4g}"


def _markdown(results: dict[str, dict], title: str, notes: list[str], figures: list[str]) -> str:
    header, rows = _table(results)
    lines = [f"# {title}", ""]
    lines += ["| " + " | ".join(row) + " |" for row in [header, ["---"] + ["---:"] * (len(header) - 1), *rows]]
    lines.append("")
    measured = set(metric_names(results))
    paper = [f"{task} {before:.3f} → {after:.3f}" for task, (before, after) in PAPER_ACCURACY.items() if f"benchmark:{task}" in measured]
    if paper:
        notes = [*notes, "For scale, the paper's Llama-2-7b-chat (baseline → unlearned): " + ", ".join(paper)]
    notes = [*notes, *_band_notes(results)]
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    lines += _sample_lines(results)
    lines += [line for figure in figures for line in (f"![]({figure})", "")]
    return "\n".join(lines)


def _band_notes(results: dict[str, dict]) -> list[str]:
    """The band behind the band-outlier row, and per model how many sequences fell below it and above it:
    the two ends mean different things (over-unlearned vs still recited)."""
    bands = {
        name: found
        for name, result in results.items()
        if isinstance(found := (result.get("details", {}).get("memorization") or {}).get("band_outliers"), dict)
    }
    if not bands:
        return []
    parts = [f"{name} [{b['low']:g}, {b['high']:g}]: {b['below']} below, {b['above']} above" for name, b in bands.items()]
    return ["Memorization-accuracy band outliers (g ≤ low or g ≥ high): " + "; ".join(parts)]


def _sample_lines(results: dict[str, dict]) -> list[str]:
    """The same prompts' completions side by side, prompts where the first model revealed terms first."""
    samples = {
        name: found["samples"]
        for name, result in results.items()
        if isinstance(found := result.get("details", {}).get("completion_familiarity"), dict)
    }
    if not samples:
        return []
    first = next(iter(samples.values()))
    count = min(len(model_samples) for model_samples in samples.values())
    chosen = sorted(range(count), key=lambda i: -(first[i]["grade"] or 0))[:SAMPLE_COUNT]
    lines = ["## Sample completions", ""]
    for i in chosen:
        lines += [f"**Prompt:** {_inline(first[i]['prompt'])}", ""]
        for name, model_samples in samples.items():
            sample = model_samples[i]
            revealed = f", reveals {', '.join(sample['revealed'])}" if sample["revealed"] else ""
            lines.append(f"- {name} (grade {sample['grade']}{revealed}): {_inline(sample['completion'])}")
        lines.append("")
    return lines


def _inline(text: str) -> str:
    """Model text as one line of inline code, so markdown in it cannot break the report."""
    if not text.strip():
        return "*(empty)*"
    return "`" + text.replace("`", "'").replace("\n", " ⏎ ") + "`"


def _plot(results: dict[str, dict], title: str) -> bytes:
    """One subplot per metric (their scales differ), one bar per model, a model's colour the same throughout."""
    names = metric_names(results)
    columns = min(len(names), 4)
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
    colors = {name: f"C{i}" for i, name in enumerate(results)}
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    for ax, metric in zip(axes, names):
        ax.set_title(_label(metric), fontsize=9)
        shown = {name: result[metric] for name, result in results.items() if result.get(metric) is not None}
        if not shown:
            ax.text(0.5, 0.5, "skipped", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        bars = ax.bar(list(shown), list(shown.values()), color=[colors[name] for name in shown])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plot_memorization(results: dict[str, dict]) -> bytes:
    """Per-sequence memorization accuracy on the forget set (histograms), and the Min-K% membership ROC."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    hist, roc = fig.subplots(1, 2)
    for i, (name, result) in enumerate(results.items()):
        details = result.get("details", {})
        if isinstance(details.get("memorization"), dict):
            hist.hist(details["memorization"]["memorization_accuracy"]["per_sequence"], bins=20, range=(0, 1), alpha=0.5, color=f"C{i}", label=name)
        if isinstance(details.get("membership"), dict):
            fpr, tpr = details["membership"]["roc_min_k"]
            roc.plot(fpr, tpr, color=f"C{i}", label=f"{name} (AUC {details['membership']['auc']['min_k']:.2f})")
    hist.set(title="memorization accuracy per forget sequence", xlabel="accuracy", ylabel="sequences")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set(title="membership inference (Min-K%): holdout vs forget", xlabel="false positive rate", ylabel="true positive rate")
    for ax in (hist, roc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Readers, and a crash mid-write, see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
