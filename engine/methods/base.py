"""The method seam: what an unlearning method declares, and nothing the recipe or the runners decide for it.

A method is one file in this package and one line in its registry (`engine/methods/__init__.py`). It
declares its training phases in order — for each: what it trains on, the model it starts from, its
per-micro-batch objective, the frozen models (a teacher) that stream per-block targets, and its
best-checkpoint rule — and what it records about a finished run. The recipe (`engine/recipe.py`) claims
outputs, checks inputs, hands each phase to a runner and evaluates; the runners (`engine/training/runners/`)
run any phase without knowing the method. See docs/methods.md for a walk-through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from configs import RunConfig, TrainConfig
from engine.data.anchors import Anchors
from engine.data.corpus import Block
from engine.training.job import PhaseResult, TeacherSpec
from engine.training.objectives import Objective
from engine.training.offset import OffsetEnsemble
from engine.training.selection import MemorizationSelection


@dataclass(frozen=True)
class Phase:
    """One training phase of a method, as the recipe hands it to a runner."""

    name: str  # names the phase's checkpoints and logs; the last phase of a method publishes RUN/unlearned
    init: Path  # the model training starts from
    train: TrainConfig
    objective: Objective
    teacher: TeacherSpec | None = None  # frozen models streaming per-block targets; None: the input ids
    keep_best: bool = False  # keep the weights of the lowest validation objective (else the final ones)
    examples: torch.Tensor | None = None  # what it trains on: None = the forget blocks; or `RunInputs.bundles()`
    selection: MemorizationSelection | None = None  # memorization-aware: which blocks steps ascend on, when to stop
    task_arithmetic: tuple[Path, float] | None = None  # (θ_ref, λ): publish θ_ref − λ·(θ − θ_ref)
    reference: Path | None = None  # a frozen model the trainer holds whose logits on the retain rows reach the objective (KL)
    offset: OffsetEnsemble | None = None  # offset unlearning: `init` is o, trained as o′ in the ensemble with M and o (held frozen)


@dataclass
class RunInputs:
    """What every method gets, loaded and checked before the run directory is touched."""

    baseline: Path | None  # the model to unlearn from (None when only evaluating a given model)
    tokenizer: object
    forget_blocks: list[Block]  # the target corpus cut into blocks: what the run makes the model forget
    outputs: dict[str, Path]  # each phase's output in the run directory
    anchors: Anchors | None  # the anchor dictionary, when the config names one (WHP needs it; evaluation reads its terms)
    retain_blocks: list[Block] = field(default_factory=list)  # the retain corpus in blocks of the same length, when given
    holdout_blocks: list[Block] = field(default_factory=list)  # unseen text like the target (eval.holdout_set), when given

    def forget_ids(self) -> torch.Tensor:
        return torch.tensor([block.input_ids for block in self.forget_blocks])

    def bundles(self, seed: int) -> torch.Tensor:
        """[B, 2, L]: each forget block with a retain block, drawn without repeats (cycling when there are
        fewer retain blocks) by a seeded permutation, so a step descends on as many retain as forget blocks."""
        order = torch.randperm(len(self.retain_blocks), generator=torch.Generator().manual_seed(seed))
        retain = torch.tensor([self.retain_blocks[int(order[i % len(order)])].input_ids for i in range(len(self.forget_blocks))])
        return torch.stack([self.forget_ids(), retain], dim=1)


@dataclass(frozen=True)
class TrainingSummary:
    """How an unlearned model was made, handed on in memory and written beside it (obliviate_training.json)."""

    method: str
    steps: int
    train_seconds: float
    workers: int  # trainer ranks (0: in process)
    throughput: dict[str, float]  # tokens/s, target wait fraction, teacher tokens/s and utilization
    details: dict = field(default_factory=dict)  # the method's own record (WHP: α, label statistics, best step)

    @classmethod
    def of(cls, method: str, result: PhaseResult, workers: int, **details: object) -> TrainingSummary:
        return cls(method, result.fit.steps, result.fit.seconds, workers, result.throughput, details)

    def as_json(self) -> dict:
        """One flat record: the common fields, then the method's."""
        common = {"method": self.method, "steps": self.steps, "train_seconds": self.train_seconds, "workers": self.workers, "throughput": self.throughput}
        return {**common, **self.details}


class Method(Protocol):
    name: ClassVar[str]  # the `method:` config value
    outputs: ClassVar[dict[str, str]]  # phase (or export) → its output's name in the run directory
    exports: ClassVar[tuple[str, ...]]  # commands that write an output for inspection, not a training phase
    teacher_role: ClassVar[str]  # how its teacher processes are named ("labeler", "reference"; "" when it has none)
    teacher_models: ClassVar[tuple[str, ...]]  # the frozen models each teacher process holds (what `plan` counts)
    trainer_frozen_models: int  # frozen models each trainer rank also holds, ZeRO-3-partitioned (a KL term's baseline, TA/TAU's θ_ref, offset's M and o)
    train_sections: ClassVar[dict[str, str]]  # each training phase → the config section of its TrainConfig

    def __init__(self, cfg: RunConfig) -> None: ...

    @property
    def uses_retain(self) -> bool:
        """Whether the unlearn phase bundles each forget block with a retain block (twice the rows per step)."""
        ...

    @property
    def phases(self) -> tuple[str, ...]:
        """The training phases `obliviate run` runs, in order; the last one writes RUN/unlearned."""
        ...

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        """Load and check this method's own inputs for the phases in `todo`; raise UserError, write nothing."""
        ...

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        """The phase `name`, built once the phases before it have published their outputs."""
        ...

    def export(self, name: str, inputs: RunInputs, staging: Path, device: torch.device) -> None:
        """Write the export `name` into `staging` (only for names in `exports`)."""
        ...

    def summary(self, result: PhaseResult) -> TrainingSummary:
        """What is recorded beside the unlearned model (obliviate_training.json) from its phase's result."""
        ...

    @staticmethod
    def describe(name: str, summary: dict) -> str:
        """One report line on how the model `name` was made, from its summary's flat record (`as_json`)."""
        ...
