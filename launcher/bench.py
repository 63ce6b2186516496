"""`obliviate bench-train`: throughput of the unlearn phase (trainer + streaming labeler) per worker count.

Runs the real phase — Ray, DeepSpeed ZeRO-3, the labeler and its queues — for a fixed number of steps with the
same per-rank micro-batch (weak scaling), and prints what a user tunes against: trained tokens/s, the
fraction of training time spent waiting for labels, the labeler's tokens/s and utilization, and on GPU the
model FLOPs utilization 6·params·tokens/s over the devices' dense bf16 peak.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open

from configs import RunConfig, derive
from engine import recipe
from kernels.device import peak_tflops

COLUMNS = ("workers", "steps", "wall s", "train s", "tokens/s", "wait fraction", "labeler tokens/s", "labeler util", "MFU")


def parameter_count(model_dir: Path) -> int:
    """From the safetensors headers: no weights are loaded."""
    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def bench_train(cfg: RunConfig, workers: list[int], out: Path, runner_for) -> list[dict]:
    """One unlearn phase per worker count into `out/workers-N`; a row of figures per run."""
    params = parameter_count(Path(cfg.baseline))
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    peak = peak_tflops(torch.device("cuda"), "bf16", None) if on_gpu else None
    rows = []
    for n in workers:
        run_cfg = derive(cfg, out=str(out / f"workers-{n}"), **{"engine.workers": n})
        start = time.perf_counter()
        with runner_for(run_cfg) as runner:
            summary = recipe.run(run_cfg, ["unlearn"], True, "bench-train", runner=runner).summary
        wall = time.perf_counter() - start
        speed = summary.throughput
        mfu = 6 * params * speed["tokens_per_s"] / (peak * 1e12 * max(n, 1)) if peak else None
        rows.append({
            "workers": n, "steps": summary.steps, "wall s": wall, "train s": summary.train_seconds,
            "tokens/s": speed["tokens_per_s"], "wait fraction": speed["label_wait_fraction"],
            "labeler tokens/s": speed["labeler_tokens_per_s"], "labeler util": speed["labeler_utilization"], "MFU": mfu,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "n/a"
        return f"{value:.3f}" if isinstance(value, float) and value < 10 else (f"{value:.0f}" if isinstance(value, float) else str(value))

    table = [list(COLUMNS)] + [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
