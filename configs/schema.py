"""Typed configuration of an obliviate run.

One `RunConfig` drives every command: YAML files in this folder give the defaults, `key=value`
overrides on the command line (`unlearn.lr=1e-5`) and plain flags (`--baseline DIR`) refine them.
OmegaConf checks types while merging; `validate()` checks values, so a bad config fails before
anything is written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from configs.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning phase (pretrain, reinforce, unlearn). Steps count optimizer updates."""

    lr: float = 3e-6
    epochs: float = 3.0
    micro_batch_size: int = 8  # blocks per forward pass
    grad_accum: int = 16  # micro-batches per optimizer step: effective batch = micro * accum
    max_steps: int = 0  # stop after this many optimizer steps (0: no cap)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.05  # blocks held out for the validation loss (best checkpoint)
    eval_every: int = 0  # validate every N optimizer steps (0: once per epoch)
    seed: int = 0

    def validate(self, name: str) -> None:
        _positive(f"{name}.lr", self.lr)
        _positive(f"{name}.epochs", self.epochs)
        _positive(f"{name}.micro_batch_size", self.micro_batch_size)
        _positive(f"{name}.grad_accum", self.grad_accum)
        for key in ("max_steps", "warmup_steps", "eval_every"):
            if getattr(self, key) < 0:
                raise UserError(f"{name}.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"{name}.val_fraction must be in [0, 1), got {self.val_fraction}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise UserError(f"{name}.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class LabelConfig:
    """Generic-label generation (docs/algorithm.md)."""

    context_length: int = 512  # tokens per block; the final partial block is dropped
    alpha: float = 5.0  # the α that the unlearn phase trains on
    alpha_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # labels for each k·α
    seed: int = 0  # translation choice per block
    forbid_anchor_keys: bool = True  # also suppress the anchor terms' own first tokens (not in the paper; false: the paper's labels)
    impl: str = "auto"  # logit-mixing implementation in kernels.generic_labels
    batch_size: int = 4  # blocks per forward pass of the frozen models

    @property
    def alphas(self) -> list[float]:
        return [self.alpha * m for m in self.alpha_multipliers]

    def validate(self) -> None:
        if self.context_length < 2:
            raise UserError(f"labels.context_length must be >= 2, got {self.context_length}")
        if self.alpha <= 0:
            raise UserError(f"labels.alpha must be > 0, got {self.alpha}")
        if not self.alpha_multipliers or 1.0 not in self.alpha_multipliers:
            raise UserError("labels.alpha_multipliers must contain 1.0 (the trained α)")
        for m in self.alpha_multipliers:
            if m <= 0:
                raise UserError(f"labels.alpha_multipliers must all be > 0, got {m}")
        _positive("labels.batch_size", self.batch_size)
        if self.impl not in ("auto", "reference", "chunked", "triton"):
            raise UserError(f"labels.impl must be auto, reference, chunked or triton, got {self.impl!r}")


@dataclass(frozen=True)
class LossConfig:
    """The direct methods' objectives (ga, graddiff, npo, simnpo; docs/methods.md) and WHP's optional retain term."""

    retain_loss: str = "nll"  # the retain term of graddiff, npo, simnpo: nll | kl (to the frozen baseline) | none (not graddiff)
    retain_weight: float = 1.0  # weight of the retain term against the forget term
    beta: float = 0.1  # NPO / SimNPO inverse temperature
    gamma: float = 0.0  # SimNPO reward margin
    whp_retain: bool = False  # WHP: add the retain term (retain_loss, retain_weight) to the generic-label loss (not in the paper)

    def validate(self) -> None:
        if self.retain_loss not in ("nll", "kl", "none"):
            raise UserError(f"loss.retain_loss must be nll, kl or none, got {self.retain_loss!r}")
        if self.retain_weight < 0:
            raise UserError(f"loss.retain_weight must be >= 0, got {self.retain_weight}")
        _positive("loss.beta", self.beta)
        if self.gamma < 0:
            raise UserError(f"loss.gamma must be >= 0, got {self.gamma}")


@dataclass(frozen=True)
class OffsetConfig:
    """Offset unlearning (offset-ga, offset-graddiff, offset-npo; docs/methods.md): the baseline M stays frozen and
    a small model o′ learns the offset of the ensemble z = z_M + α·(z_o′ − z_o)."""

    small: str = ""  # o: a smaller causal LM with the baseline's tokenizer and vocabulary; o′ is trained from it
    alpha: float = 1.0  # the offset's weight α
    # o′'s learning rate (unset: unlearn.lr). The small model starts from an offset of exactly 0 and is a few
    # times narrower than M: on the tiny world it needs ~10× the rate the direct methods take at the same steps.
    lr: Optional[float] = None

    def validate(self) -> None:
        _positive("offset.alpha", self.alpha)
        if self.lr is not None:
            _positive("offset.lr", self.lr)


@dataclass(frozen=True)
class MemorizationConfig:
    """Memorization-aware unlearning (sga, ta, tau): the score g(x), selection, stopping, task arithmetic.

    g(x) is the greedy next-token accuracy after `prefix_length` tokens (teacher forced), the suite's
    memorization accuracy. Unset levels take the method's defaults (docs/methods.md)."""

    prefix_length: int = 32  # tokens of each block given before g is counted
    select_threshold: float = 0.7  # τ: SGA/TAU ascend only on blocks with g >= τ (plus the most memorized one)
    stop_level: Optional[float] = None  # stop once the mean g falls below this; unset: the baseline's mean g on eval.holdout_set
    switch_level: Optional[float] = None  # TA/TAU: ascend until the mean g falls below this (unset: 0.9 TA, 0.5 TAU)
    task_lambda: Optional[float] = None  # TA/TAU: θ_ref − λ·(θ_ft − θ_ref) (unset: 3 TA, 1 TAU)
    rescore_every: int = 0  # optimizer steps between re-scorings of g (0: every epoch)

    def validate(self) -> None:
        _positive("memorization.prefix_length", self.prefix_length)
        for key in ("select_threshold", "stop_level", "switch_level"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"memorization.{key} must be in [0, 1], got {value}")
        if self.task_lambda is not None:
            _positive("memorization.task_lambda", self.task_lambda)
        if self.rescore_every < 0:
            raise UserError(f"memorization.rescore_every must be >= 0, got {self.rescore_every}")


@dataclass(frozen=True)
class ModelShape:
    """Shape of a tiny Llama the demo pretrains; its vocabulary is the world's tokenizer."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 512

    def validate(self, section: str) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position_embeddings"):
            _positive(f"{section}.{key}", getattr(self, key))
        if self.hidden_size % self.num_heads:
            raise UserError(f"{section}.hidden_size ({self.hidden_size}) must be a multiple of {section}.num_heads ({self.num_heads})")


@dataclass(frozen=True)
class ModelConfig(ModelShape):
    """Shape of the tiny Llama baseline and oracle the demo pretrains (ignored when a baseline is given), and
    the size of the SentencePiece vocabulary trained for them."""

    vocab_size: int = 2048


SMALL_SHAPE = ModelShape(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2)  # ~3.6× fewer parameters than the baseline


@dataclass(frozen=True)
class WorldConfig:
    """The tiny world: generated corpora, SentencePiece tokenizer, baseline and oracle models (and, when asked
    for, offset unlearning's small model)."""

    seed: int = 0
    size: float = 1.0  # scales the amount of generated text
    model: ModelConfig = field(default_factory=ModelConfig)
    # Offset unlearning's pair o / o′: pretrained like the baseline (same tokenizer, text and recipe), built into
    # the world's cache when an offset method asks for it (`obliviate compare --demo --methods offset-npo`).
    small: ModelShape = field(default_factory=lambda: SMALL_SHAPE)
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=3e-3, epochs=4, micro_batch_size=16, grad_accum=1, warmup_steps=20, val_fraction=0.0)
    )
    context_length: int = 128  # block length for pretraining
    cache_dir: str = "~/.cache/obliviate"  # built worlds are cached here by config hash

    def validate(self) -> None:
        _positive("world.size", self.size)
        _positive("world.model.vocab_size", self.model.vocab_size)
        self.model.validate("world.model")
        self.small.validate("world.small")
        if not 2 <= self.context_length <= self.model.max_position_embeddings:
            raise UserError(f"world.context_length must be in [2, world.model.max_position_embeddings = {self.model.max_position_embeddings}], got {self.context_length}")


# The general benchmarks the paper reports (lm-eval task names; their data downloads on first use) with its
# Llama-2-7b-chat accuracies (baseline, unlearned), which the report prints beside ours.
PAPER_ACCURACY = {
    "arc_challenge": (0.440, 0.414),
    "arc_easy": (0.744, 0.724),
    "boolq": (0.807, 0.796),
    "hellaswag": (0.577, 0.557),
    "openbookqa": (0.338, 0.328),
    "piqa": (0.767, 0.760),
    "winogrande": (0.663, 0.657),
}
PAPER_TASKS = tuple(PAPER_ACCURACY)


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation suite (`obliviate eval --suite FILE` loads a YAML of these fields); "" / [] skips a part."""

    probes: str = ""  # JSON/JSONL: {prompt, targets: [words]} for probability familiarity
    completions: str = ""  # JSON/JSONL: {prompt, references: [terms], subtlety?} for completion familiarity
    general_text: str = ""  # held-out general text for perplexity
    forget_set: str = ""  # the text to forget (corpus formats): memorization, membership inference, oracle closeness
    holdout_set: str = ""  # unseen text of the same kind: memorization thresholds, membership inference
    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS))  # lm-eval tasks ([] skips; a suite file lists its own)
    task_dirs: list[str] = field(default_factory=list)  # folders of local lm-eval task YAMLs
    task_limit: int = 0  # documents per task (0: all)
    judge: str = "rule"  # completion judge: rule | llm
    judge_model: str = ""  # local HF instruct model for judge=llm
    target_description: str = "the target text"  # how the LLM judge's rubric names the target ("the Harry Potter books")
    sample: bool = False  # completions: sampled (seeded) instead of greedy
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 24
    sequence_length: int = 64  # forget/holdout texts are cut into sequences of this many tokens
    max_sequences: int = 32  # per set (the first ones)
    prefix_length: int = 32  # memorization: tokens given before the model continues
    el_n: int = 10  # extraction likelihood EL_n (Jang et al. use n = 10)
    el_stride: int = 16  # EL_n evaluates every stride-th prefix (cost control)
    min_k: float = 0.2  # Min-K% Prob membership score
    outlier_band: list[float] = field(default_factory=lambda: [0.15, 0.60])  # [low, high]: forget sequences with memorization accuracy <= low or >= high are outliers
    perturbations: int = 4  # perturbed copies per sequence for the perturbation membership attack (0: no attack)
    perturb_fraction: float = 0.15  # of a sequence's tokens (after the first) the attack resamples
    perturb_span: int = 2  # tokens per resampled span
    context_length: int = 512  # perplexity window (tokens)
    batch_size: int = 8
    attacks: list[str] = field(default_factory=list)  # re-evaluate each unlearned model attacked: quant8 | quant4 | relearn (engine/evaluation/attacks.py)
    relearn_steps: list[int] = field(default_factory=lambda: [2, 4, 8])  # relearn: evaluate after these many fine-tuning steps
    relearn_blocks: int = 8  # relearn: forget-set blocks of sequence_length after the evaluated ones, one step's batch
    relearn_lr: float = 1e-5  # relearn: AdamW learning rate
    in_process: bool = False  # evaluate in the driver, the model whole, even with the Ray engine (models that fit one device: no start-up, no collectives)

    def validate(self) -> None:
        for attack in self.attacks:
            if attack not in ("quant8", "quant4", "relearn"):
                raise UserError(f"eval.attacks: unknown attack {attack!r} (choose from quant8, quant4, relearn)")
        if not self.relearn_steps or any(steps < 1 for steps in self.relearn_steps):
            raise UserError(f"eval.relearn_steps must be step counts >= 1, got {self.relearn_steps}")
        _positive("eval.relearn_blocks", self.relearn_blocks)
        _positive("eval.relearn_lr", self.relearn_lr)
        if len(set(self.attacks)) != len(self.attacks):
            raise UserError("eval.attacks names an attack twice")
        if self.judge not in ("rule", "llm"):
            raise UserError(f"eval.judge must be rule or llm, got {self.judge!r}")
        if self.judge == "llm" and not self.judge_model:
            raise UserError("eval.judge=llm needs eval.judge_model (a local instruct model directory)")
        for key in ("max_new_tokens", "sequence_length", "max_sequences", "prefix_length", "el_n", "el_stride", "context_length", "batch_size"):
            _positive(f"eval.{key}", getattr(self, key))
        if self.prefix_length >= self.sequence_length or self.el_n >= self.sequence_length:
            raise UserError(f"eval.prefix_length ({self.prefix_length}) and eval.el_n ({self.el_n}) must be below eval.sequence_length ({self.sequence_length})")
        if not 0 < self.min_k <= 1:
            raise UserError(f"eval.min_k must be in (0, 1], got {self.min_k}")
        band = list(self.outlier_band)
        if len(band) != 2 or not all(isinstance(x, (int, float)) for x in band) or not 0 <= band[0] < band[1] <= 1:
            raise UserError(f"eval.outlier_band must be two numbers [low, high] with 0 <= low < high <= 1, got {band}")
        if self.perturbations < 0:
            raise UserError(f"eval.perturbations must be >= 0, got {self.perturbations}")
        if not 0 < self.perturb_fraction <= 1:
            raise UserError(f"eval.perturb_fraction must be in (0, 1], got {self.perturb_fraction}")
        _positive("eval.perturb_span", self.perturb_span)
        if self.task_limit < 0:
            raise UserError(f"eval.task_limit must be >= 0, got {self.task_limit}")
        _positive("eval.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise UserError(f"eval.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class EngineConfig:
    """Where and how training runs: Ray workers with DeepSpeed ZeRO-3, or this process (workers: 0)."""

    workers: int = 1  # trainer ranks; one GPU each when the cluster has GPUs. 0: no Ray/DeepSpeed, train in-process
    ray_address: str = ""  # "" → $RAY_ADDRESS, else a local cluster started for the run (loopback only)
    labelers: int = 1  # labeler actors (one GPU each on GPU), each owning a share of the blocks
    labeler_shards: int = 1  # labelers per ZeRO-3 group sharing the two frozen models (1: each holds both whole)
    cpus_per_worker: int = 1  # CPU threads of each trainer rank (and of each labeler on CPU)
    queue_depth: int = 2  # steps of labels buffered per rank between labeler and trainer
    checkpoint_every: int = 100  # optimizer steps between checkpoints (also written on SIGINT/SIGTERM)
    keep_checkpoints: bool = False  # keep RUN/checkpoints/PHASE after the phase has published its model
    max_restarts: int = 2  # restarts from the latest checkpoint when a trainer or the labeler dies
    label_timeout_s: float = 600.0  # a trainer waiting longer than this for labels fails (and restarts)
    deepspeed: str = ""  # DeepSpeed JSON merged over the generated one (escape hatch: offload, stage, ...)
    dashboard: bool = False  # Ray dashboard of a local cluster, on 127.0.0.1 only

    def validate(self) -> None:
        for key in ("workers", "checkpoint_every", "max_restarts"):
            if getattr(self, key) < 0:
                raise UserError(f"engine.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("labelers", "labeler_shards", "cpus_per_worker", "queue_depth", "label_timeout_s"):
            _positive(f"engine.{key}", getattr(self, key))
        if self.labelers % self.labeler_shards:
            raise UserError(f"engine.labelers ({self.labelers}) must be a multiple of engine.labeler_shards ({self.labeler_shards}): the labelers form groups of that many")
        if self.labeler_shards > 1 and self.workers == 0:
            raise UserError("engine.labeler_shards > 1 needs the Ray engine (engine.workers >= 1): sharded labelers are separate processes")


@dataclass(frozen=True)
class RunConfig:
    out: str = MISSING  # run directory
    method: str = "whp"  # the unlearning method (engine/methods/): whp | ga | graddiff | npo | simnpo | sga | ta | tau | offset-ga | offset-graddiff | offset-npo
    sized_for: str = ""  # the Llama shape a ready-made config is sized for (kernels/device.py LLAMAS): what `plan` counts without a baseline
    baseline: str = ""  # Hugging Face causal-LM directory ("" in the demo: the world builds it)
    target: str = ""  # target corpus: .txt, .jsonl/.json with a "text" field, or a folder of those
    anchors: str = ""  # anchor dictionary, YAML or JSON: term -> [generic translations]
    reinforced: str = ""  # skip the reinforce phase and use this model
    oracle: str = ""  # a model that never saw the target, for comparison in the report
    retain: str = ""  # retain corpus (same formats as target): general text the model must keep (graddiff; npo/simnpo's retain term)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (training keeps fp32 master weights either way)
    world: WorldConfig = field(default_factory=WorldConfig)
    reinforce: TrainConfig = field(default_factory=TrainConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    unlearn: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, epochs=2))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, epochs=1, val_fraction=0.0))  # TA/TAU: θ_ft from θ_ref
    loss: LossConfig = field(default_factory=LossConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    offset: OffsetConfig = field(default_factory=OffsetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        _finite_numbers(self, "")
        self.engine.validate()
        self.eval.validate()
        self.reinforce.validate("reinforce")
        self.unlearn.validate("unlearn")
        self.finetune.validate("finetune")
        self.loss.validate()
        self.memorization.validate()
        self.offset.validate()
        self.world.pretrain.validate("world.pretrain")
        self.world.validate()
        self.labels.validate()
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


def _positive(name: str, value: float) -> None:
    if not value > 0:  # NaN fails here too
        raise UserError(f"{name} must be > 0, got {value}")


def _finite_numbers(section: object, prefix: str) -> None:
    """Every float of the config, in lists too, is a finite number: NaN and ±inf pass every range check."""
    for item in fields(section):
        value, name = getattr(section, item.name), f"{prefix}{item.name}"
        if is_dataclass(value):
            _finite_numbers(value, f"{name}.")
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise UserError(f"{name} must be a finite number, got {number}")


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), suite: str | Path | None = None, not_required: tuple[str, ...] = (), **fields: str
) -> RunConfig:
    """Merge defaults ← YAML file ← suite YAML (the `eval` section) ← dotted overrides ← non-empty plain-flag
    fields; validate. The result is immutable: a command that needs a variant asks `derive`. Keys the file
    marks `???` must be given, except those in `not_required` (`plan` needs no baseline directory)."""
    try:
        cfg = _writable(OmegaConf.structured(RunConfig))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise UserError(f"config file not found: {path}")
            file_cfg = _load_yaml(path, "config")
            cfg = OmegaConf.merge(cfg, file_cfg)
            for key in _required_by(file_cfg):  # "???" in the file: the user must give it (merge keeps the default)
                if key not in not_required:
                    OmegaConf.update(cfg, key, "???")
        if suite:
            cfg = OmegaConf.merge(cfg, {"eval": _suite(Path(suite))})
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        set_fields = {k: v for k, v in fields.items() if v not in (None, "")}
        if set_fields:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(set_fields))
        run: RunConfig = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = e.full_key
        raise UserError(f"no value for {key}: pass --{key} or {key}=... (or set it in the config file)") from None
    except OmegaConfBaseException as e:
        raise UserError(f"bad config: {_first_line(e)}") from None
    except (ValueError, yaml.YAMLError) as e:  # YAML syntax errors and malformed overrides
        raise UserError(f"bad config: {_first_line(e)}") from None
    run.validate()
    return run


def _writable(node: DictConfig) -> DictConfig:
    """The merge tree of the frozen dataclasses, writable while it is built (`to_object` freezes it again)."""
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def derive(cfg: RunConfig, **changes: object) -> RunConfig:
    """A validated copy of `cfg` with dotted keys changed (`derive(cfg, **{"unlearn.max_steps": 20})`): the one
    way a command makes a variant of a resolved config (the demo's second run, a benchmark's worker counts)."""
    merged = _writable(OmegaConf.structured(cfg))
    for key, value in changes.items():
        OmegaConf.update(merged, key, value, merge=False)
    derived: RunConfig = OmegaConf.to_object(merged)
    derived.validate()
    return derived


def _load_yaml(path: Path, what: str) -> DictConfig:
    """A YAML mapping; a syntax error names the file, line and column."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"bad {what} {where}: not valid YAML: {e.problem or e.context}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the {what} file {path}: {_first_line(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"the {what} file {path} must be a YAML mapping of settings")
    return loaded


def _required_by(file_cfg) -> list[str]:
    """Dotted keys a config file marks `???` (mandatory), at any depth."""
    if not isinstance(file_cfg, DictConfig):
        return []
    found = []
    for key in file_cfg:
        if OmegaConf.is_missing(file_cfg, key):
            found.append(str(key))
        else:
            found += [f"{key}.{inner}" for inner in _required_by(file_cfg[key])]
    return found


SUITE_PARTS = ("probes", "completions", "general_text", "forget_set", "tasks")
SUITE_FILES = ("probes", "completions", "general_text", "forget_set", "holdout_set", "judge_model")


def _suite(path: Path):
    if not path.is_file():
        raise UserError(f"suite file not found: {path}")
    suite = _load_yaml(path, "suite")
    if not isinstance(suite, DictConfig) or not any(suite.get(part) for part in SUITE_PARTS):
        raise UserError(f"suite {path} measures nothing: give at least one of {', '.join(SUITE_PARTS)}")
    if "tasks" not in suite:  # a suite file is explicit: benchmarks only when it lists them
        suite["tasks"] = []
    for key in SUITE_FILES:  # relative paths are relative to the suite file
        if isinstance(suite.get(key), str) and suite[key] and not Path(suite[key]).expanduser().is_absolute():
            suite[key] = str(path.parent.resolve() / suite[key])
    if suite.get("task_dirs"):
        suite["task_dirs"] = [str(path.parent.resolve() / d) for d in suite["task_dirs"]]
    return suite


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write atomically: a record is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    OmegaConf.save(OmegaConf.structured(cfg), tmp)
    os.replace(tmp, path)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    key = next((line for line in lines if line.startswith("full_key:")), "")
    return lines[0] + (f" ({key})" if key else "") if lines else type(e).__name__
