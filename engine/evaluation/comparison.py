"""Several unlearning methods side by side: comparison.json, comparison.md and comparison.png.

Pure functions on one evaluation's results (`evaluate_model` dicts, as `recipe.evaluate` returns them or as
metrics.json holds them) and on what each method's training recorded. Nothing here knows a method: a row
is whatever the results hold for a model, and any metric a model lacks is None (null, "–" in the table).

Rows: the baseline, each method (keyed by its name), the oracle when there is one. Per row: familiarity
(probability, completion), general perplexity, the memorization means, the outlier counts the results hold
(`outliers`: forget sequences memorized beyond unseen text; `memorization_outliers`: those outside the
memorization-accuracy band, where the suite reports them), the membership AUCs, PrivLeak and the KS forget quality (against the oracle), the changes against the
baseline that the plot draws (probability-familiarity drop, perplexity rise) and the general-text NLL rise
(log perplexity), and for a method the seconds
its training took and its trained tokens/s.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from engine.evaluation.report import write_atomic

SCHEMA_VERSION = 1
MISSING = "–"
SCORES = (  # flat scores copied as they are (each `mia_auc_*` the results hold joins the membership AUCs)
    "probability_familiarity", "completion_familiarity", "perplexity",
    "memorization_accuracy", "extraction_likelihood", "verbatim_rouge", "privleak", "forget_quality",
)
AUCS = ("mia_auc_loss", "mia_auc_zlib", "mia_auc_min_k")  # always in a row; others where measured
OUTLIERS = {  # row key: the flat scores, then the `details.memorization` entries ({"count": ...}) that may hold it
    "outliers": (("memorized_outliers",), ("outliers",)),
    "memorization_outliers": (("memorization_outliers", "memorization_band_outliers"), ("memorization_outliers", "band_outliers")),
}
CHANGES = ("probability_familiarity_drop", "perplexity_rise", "nll_rise")
TRAINING = ("wall_seconds", "train_seconds", "steps", "tokens_per_s")
HEADERS = {  # the markdown table's columns: row key → header (membership AUCs inserted before forget quality)
    "probability_familiarity": "prob. familiarity",
    "completion_familiarity": "completion familiarity",
    "perplexity": "perplexity",
    "memorization_accuracy": "memorization acc.",
    "outliers": "outliers",
    "memorization_outliers": "memorization outliers",
    "forget_quality": "forget quality (KS p)",
    "probability_familiarity_drop": "prob. familiarity drop",
    "perplexity_rise": "perplexity rise",
    "nll_rise": "general NLL rise",
    "wall_seconds": "wall s",
    "tokens_per_s": "tokens/s",
}


def results_from_metrics(metrics: dict) -> dict[str, dict]:
    """metrics.json (`report.write_report`) back into results: per model its flat scores and "details"."""
    details = metrics.get("details") or {}
    return {name: {**(scores or {}), "details": details.get(name) or {}} for name, scores in (metrics.get("models") or {}).items()}


def _number(value) -> float | int | None:
    """A finite number, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _count(result: dict, flats: tuple[str, ...], entries: tuple[str, ...]) -> int | float | None:
    """An outlier count: the first flat score present, else the first `details.memorization.<entry>.count`
    (or `details.<entry>.count`)."""
    for flat in flats:
        if _number(result.get(flat)) is not None:
            return _number(result[flat])
    details = result.get("details") if isinstance(result.get("details"), dict) else {}
    memorization = details.get("memorization") if isinstance(details.get("memorization"), dict) else {}
    for entry in entries:
        for holder in (memorization, details):
            found = holder.get(entry)
            if isinstance(found, dict) and _number(found.get("count")) is not None:
                return found["count"]
    return None


def auc_keys(results: dict[str, dict]) -> list[str]:
    """The membership AUCs: loss, zlib and Min-K% always, then any other `mia_auc_*` a model holds."""
    found = {key for result in results.values() for key in result if key.startswith("mia_auc_")}
    return [*AUCS, *sorted(found - set(AUCS))]


def _relative(value, minus, over) -> float | None:
    """(value - minus) / over; None where one is missing or `over` is 0."""
    value, minus, over = _number(value), _number(minus), _number(over)
    return None if value is None or minus is None or not over else (value - minus) / over


def model_row(result: dict, baseline: dict | None, aucs: tuple[str, ...] | list[str] = AUCS) -> dict:
    """One model's row: its scores, outlier counts and changes against the baseline; None where missing."""
    row = {key: _number(result.get(key)) for key in (*SCORES, *aucs)}
    row.update({key: _count(result, flats, entries) for key, (flats, entries) in OUTLIERS.items()})
    baseline = baseline or {}
    row["probability_familiarity_drop"] = _relative(baseline.get("probability_familiarity"), row["probability_familiarity"], baseline.get("probability_familiarity"))
    row["perplexity_rise"] = _relative(row["perplexity"], baseline.get("perplexity"), baseline.get("perplexity"))
    row["nll_rise"] = _relative(*(_log(value) for value in (row["perplexity"], baseline.get("perplexity"), baseline.get("perplexity"))))
    return row


def _log(perplexity) -> float | None:
    """The mean token NLL (nats) of a perplexity; None where not measured."""
    value = _number(perplexity)
    return math.log(value) if value is not None and value > 0 else None


def training_row(training: dict | None) -> dict:
    """Wall seconds (measured around the method's training) and, from its summary, steps, loop seconds, tokens/s."""
    training = training or {}
    summary = training.get("summary") or {}
    throughput = summary.get("throughput") if isinstance(summary.get("throughput"), dict) else {}
    return {
        "wall_seconds": _number(training.get("wall_seconds")),
        "train_seconds": _number(summary.get("train_seconds")),
        "steps": _number(summary.get("steps")),
        "tokens_per_s": _number(throughput.get("tokens_per_s")),
    }


def build_comparison(results: dict[str, dict], methods: list[str], training: dict[str, dict] | None = None, title: str = "obliviate compare", paths: dict[str, str] | None = None) -> dict:
    """comparison.json's content. `results`: per model name ("baseline", each method, "oracle") its evaluation;
    `training`: per method {"wall_seconds": s, "summary": its TrainingSummary's flat record}; a model missing
    from `results` gets a row of None."""
    training, paths = training or {}, paths or {}
    baseline, aucs = results.get("baseline"), auc_keys(results)
    names = [name for name in ("baseline",) if name in results] + list(methods) + [name for name in ("oracle",) if name in results]
    models = {}
    for name in names:
        role = "method" if name in methods else name
        row = {"role": role, "path": str(paths[name]) if name in paths else None, **model_row(results.get(name) or {}, baseline, aucs)}
        row.update(training_row(training.get(name)) if role == "method" else dict.fromkeys(TRAINING))
        models[name] = row
    return {
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "baseline": "baseline" if "baseline" in results else None,
        "oracle": "oracle" if "oracle" in results else None,
        "methods": list(methods),
        "models": models,
    }


def _cell(key: str, value) -> str:
    if value is None:
        return MISSING
    if key in CHANGES:
        return f"{value:+.1%}"
    if key in ("wall_seconds",):
        return f"{value:.1f}"
    if key in ("tokens_per_s", "outliers", "memorization_outliers", "steps"):
        return f"{value:.0f}"
    return f"{value:.4g}"


def columns(comparison: dict) -> dict[str, str]:
    """The table's columns, row key → header: `HEADERS` with the rows' membership AUCs before forget quality."""
    aucs = auc_keys(comparison["models"])
    result = {}
    for key, header in HEADERS.items():
        if key == "forget_quality":
            result.update({auc: f"AUC {auc.removeprefix('mia_auc_').replace('min_k', 'Min-K%')}" for auc in aucs})
        result[key] = header
    return result


def markdown_table(comparison: dict) -> str:
    """One row per model, the columns of `columns`; "–" where not measured."""
    shown = columns(comparison)
    header = ["model", *shown.values()]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, row in comparison["models"].items():
        lines.append("| " + " | ".join([name, *(_cell(key, row.get(key)) for key in shown)]) + " |")
    return "\n".join(lines)


def markdown(comparison: dict) -> str:
    """comparison.md: the table, what its columns mean, the plot."""
    notes = (
        f"Changes are against the baseline; {MISSING}: not measured. Outliers: forget sequences memorized beyond unseen "
        "text; memorization outliers: forget sequences outside the memorization-accuracy band. Forget quality: the KS "
        "p-value of forget-set losses against the oracle's (1 = like the oracle). Wall s: the method's training as the "
        "compare command measured it (the first method's includes starting the Ray cluster, when the engine uses one); "
        "tokens/s: its trained tokens per second."
    )
    title = comparison.get("title", "obliviate compare")
    return "\n".join([f"# {title}", "", markdown_table(comparison), "", notes, "", "![forgetting vs damage](comparison.png)", ""])


DAMAGE_LABELS = {"perplexity_rise": "perplexity rise vs baseline (%): damage", "nll_rise": "general-text NLL rise vs baseline (%): damage"}


def plot(comparison: dict, damage: str = "perplexity_rise", target: dict | None = None) -> bytes:
    """Forgetting vs damage: probability-familiarity drop against `damage` (a change of `CHANGES`), one
    labelled point per model; `target` ({"probability_familiarity_drop": d, damage: r}) draws the lines of
    d forgetting and r damage: a point above and left of both reaches it."""
    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    skipped, rises = [], []
    for i, (name, row) in enumerate(comparison["models"].items()):
        x, y = row.get(damage), row.get("probability_familiarity_drop")
        if x is None or y is None:
            skipped.append(name)
            continue
        marker = {"baseline": "s", "oracle": "*"}.get(row.get("role"), "o")
        color = "grey" if row.get("role") == "baseline" else f"C{i}"
        ax.scatter([100 * x], [100 * y], marker=marker, s=80 if marker == "*" else 45, color=color, zorder=3)
        ax.annotate(name, (100 * x, 100 * y), textcoords="offset points", xytext=(6, 4), fontsize=9)
        rises.append(abs(100 * x))
    if rises and max(rises) > 100:  # a method that wrecked the model would squash the others against the axis
        ax.set_xscale("symlog", linthresh=10)
    ax.margins(0.15)
    if target:
        ax.axvline(100 * target[damage], color="green", linewidth=0.8, linestyle="--", zorder=1)
        ax.axhline(100 * target["probability_familiarity_drop"], color="green", linewidth=0.8, linestyle="--", zorder=1)
    ax.axhline(0, color="lightgrey", linewidth=0.8, zorder=1)
    ax.axvline(0, color="lightgrey", linewidth=0.8, zorder=1)
    ax.set(xlabel=DAMAGE_LABELS[damage], ylabel="probability-familiarity drop vs baseline (%): forgetting")
    ax.set_title(comparison.get("title", "obliviate compare"), fontsize=10)
    if skipped:
        ax.text(0.01, 0.01, f"not measured: {', '.join(skipped)}", transform=ax.transAxes, fontsize=8, color="grey")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_comparison(run_dir: Path, comparison: dict) -> None:
    """comparison.json, comparison.png and comparison.md (which embeds the plot) into run_dir, each atomically."""
    run_dir = Path(run_dir)
    write_atomic(run_dir / "comparison.json", json.dumps(comparison, indent=2).encode() + b"\n")
    write_atomic(run_dir / "comparison.png", plot(comparison))
    write_atomic(run_dir / "comparison.md", markdown(comparison).encode())
