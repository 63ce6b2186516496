"""Task arithmetic for unlearning, TA and TAU (Barbulescu & Triantafillou, ICML 2024).

1. ascend — from the baseline, gradient ascent (TA) or selective gradient ascent (TAU) until the mean
   memorization g of the forget blocks falls below the switch point (`memorization.switch_level`;
   0.9 TA, 0.5 TAU): θ_ref, published as RUN/ascended.
2. unlearn — fine-tune θ_ref on the forget set (`finetune` settings): θ_ft; publish
   θ_ref − λ·(θ_ft − θ_ref) (`memorization.task_lambda`; 3 TA, 1 TAU), moving away from what fine-tuning
   on the forget set adds. Under ZeRO-3 the arithmetic runs on each rank's own partitions.
"""

from __future__ import annotations

from typing import ClassVar

from engine.methods.base import Phase, RunInputs, TrainingSummary
from engine.methods.gradient_ascent import GradientAscent
from engine.methods.sga import check_prefix
from engine.models import check_model_dir
from engine.training.job import PhaseResult
from engine.training.objectives import NEXT_TOKEN
from engine.training.selection import MemorizationSelection


class TaskArithmetic(GradientAscent):
    name: ClassVar[str] = "ta"
    outputs: ClassVar[dict[str, str]] = {"ascend": "ascended"}
    what: ClassVar[str] = "task arithmetic (gradient ascent to the switch point, then θ_ref − λ·(θ_ft − θ_ref))"
    phases = ("ascend", "unlearn")
    trainer_frozen_models: ClassVar[int] = 1  # θ_ref, loaded partitioned for the arithmetic before the final save
    train_sections: ClassVar[dict[str, str]] = {"ascend": "unlearn", "unlearn": "finetune"}
    switch_level: ClassVar[float] = 0.9
    task_lambda: ClassVar[float] = 3.0
    selective: ClassVar[bool] = False  # TAU: the ascent is selective

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        check_prefix(self.cfg)
        if "unlearn" in todo and "ascend" not in todo:
            check_model_dir(inputs.outputs["ascend"], "ascended")

    @property
    def scale(self) -> float:
        """λ: the configured one, else the method's."""
        given = self.cfg.memorization.task_lambda
        return self.task_lambda if given is None else given

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        m, train = self.cfg.memorization, getattr(self.cfg, self.train_sections[name])
        if name == "ascend":
            switch = self.switch_level if m.switch_level is None else m.switch_level
            selection = MemorizationSelection(m.prefix_length, m.select_threshold if self.selective else 0.0, switch, m.rescore_every, batch_size=self.cfg.eval.batch_size)
            return Phase("ascend", inputs.baseline, train, self.objective(), selection=selection)
        ascended = inputs.outputs["ascend"]
        return Phase("unlearn", ascended, train, NEXT_TOKEN, task_arithmetic=(ascended, self.scale))

    def summary(self, result: PhaseResult) -> TrainingSummary:
        lr = getattr(self.cfg, self.train_sections["unlearn"]).lr
        return TrainingSummary.of(self.name, result, self.cfg.engine.workers, final_loss=None, lr=lr, task_lambda=self.scale, retain=False)

    @classmethod
    def describe(cls, name: str, s: dict) -> str:
        engine = f"{s['workers']} DeepSpeed ZeRO-3 worker(s)" if s.get("workers") else "in-process"
        return f"{name}: {cls.what}, λ = {s['task_lambda']:g}, fine-tuned {s['steps']} steps at lr {s['lr']:g}, trained {engine}"


class TAU(TaskArithmetic):
    name: ClassVar[str] = "tau"
    what: ClassVar[str] = "task arithmetic on selective ascent (SGA to the switch point, then θ_ref − λ·(θ_ft − θ_ref))"
    switch_level: ClassVar[float] = 0.5
    task_lambda: ClassVar[float] = 1.0
    selective: ClassVar[bool] = True
