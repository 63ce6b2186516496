"""Who's Harry Potter? (Eldan & Russinovich, 2023): reinforce, then unlearn on generic labels (docs/algorithm.md).

1. reinforce — keep training the baseline on the target: the tokens whose probability grows are the
   target-specific ones.
2. unlearn — fine-tune the baseline on the original tokens toward generic labels
   `argmax(v_base − α·ReLU(v_reinf − v_base))`, which labelers (this method's teachers: the frozen baseline
   on anchor-translated text and the reinforced model on the original) stream while it trains; the weights
   of the lowest validation loss on the generic labels are kept.
`obliviate labels` exports every block's labels to RUN/labels for inspection (unlearn makes its own).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch

from configs import RunConfig
from configs.errors import UserError
from engine.data.translation import anchor_pattern
from engine.methods.base import Phase, RunInputs, TrainingSummary
from engine.methods.generic_labels import LabelerSpec, build_labels
from engine.models import check_model_dir, check_same_tokenizer, check_tokenizer_fits, load_model, load_tokenizer, pick_device
from engine.training.job import PhaseResult
from engine.training.objectives import NEXT_TOKEN, RetainedNextTokenLoss
from kernels.mixing import interpreter_requested

log = logging.getLogger("obliviate")


class WHP:
    name: ClassVar[str] = "whp"
    outputs: ClassVar[dict[str, str]] = {"reinforce": "reinforced", "labels": "labels"}
    exports: ClassVar[tuple[str, ...]] = ("labels",)
    teacher_role: ClassVar[str] = "labeler"
    teacher_models: ClassVar[tuple[str, ...]] = ("baseline", "reinforced")
    train_sections: ClassVar[dict[str, str]] = {"reinforce": "reinforce", "unlearn": "unlearn"}

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.anchors: dict[str, list[str]] = {}
        self.reinforced: Path | None = Path(cfg.reinforced).expanduser() if cfg.reinforced else None

    @property
    def uses_retain(self) -> bool:
        """`loss.whp_retain`: each forget block bundled with a retain block, whose NLL (or KL to the baseline)
        joins the generic-label loss — not in the paper; off by default."""
        return self.cfg.loss.whp_retain and self.cfg.loss.retain_loss != "none"

    @property
    def trainer_frozen_models(self) -> int:
        return int(self.uses_retain and self.cfg.loss.retain_loss == "kl")

    @property
    def phases(self) -> tuple[str, ...]:
        return ("unlearn",) if self.cfg.reinforced else ("reinforce", "unlearn")

    def prepare(self, todo: list[str], inputs: RunInputs) -> None:
        if not {"labels", "unlearn"} & set(todo):
            return
        in_this_process = "labels" in todo or self.cfg.engine.workers == 0
        if self.cfg.labels.impl == "triton" and in_this_process and pick_device(self.cfg.device).type == "cpu" and not interpreter_requested():
            raise UserError("labels.impl=triton on CPU needs the Triton interpreter: set TRITON_INTERPRET=1")
        if inputs.anchors is None:
            raise UserError("no anchor dictionary given (use --anchors or set it in the config)")
        if self.uses_retain and "unlearn" in todo and not inputs.retain_blocks:
            raise UserError("loss.whp_retain needs a retain set: give retain: (general text the model must keep)")
        self.anchors = inputs.anchors.terms
        pattern = anchor_pattern(self.anchors)
        if not any(pattern.search(block.text) for block in inputs.forget_blocks):
            raise UserError(f"none of the {len(self.anchors)} anchor terms of {self.cfg.anchors} occurs in the target corpus {self.cfg.target}: the labels would equal plain fine-tuning")
        if "reinforce" not in todo:
            self.reinforced = check_model_dir(self.reinforced or inputs.outputs["reinforce"], "reinforced")
            tokenizer = load_tokenizer(self.reinforced, "reinforced")
            check_tokenizer_fits(tokenizer, self.reinforced, "reinforced")
            check_same_tokenizer(inputs.tokenizer, tokenizer, ("baseline", "reinforced"))

    def phase(self, name: str, inputs: RunInputs) -> Phase:
        if name == "reinforce":
            return Phase("reinforce", inputs.baseline, self.cfg.reinforce, NEXT_TOKEN)
        for key, reason in inputs.anchors.dropped:  # logged once the run has started: checks print one line or none
            log.info("anchor %r dropped: %s", key, reason)
        labeler = LabelerSpec(inputs.baseline, self._reinforced(inputs), inputs.forget_blocks, self.anchors, self.cfg.labels)
        if not self.uses_retain:
            return Phase("unlearn", inputs.baseline, self.cfg.unlearn, NEXT_TOKEN, teacher=labeler, keep_best=True)
        reference = inputs.baseline if self.trainer_frozen_models else None
        objective = RetainedNextTokenLoss(self.cfg.loss.retain_weight)
        return Phase("unlearn", inputs.baseline, self.cfg.unlearn, objective, teacher=labeler, keep_best=True, examples=inputs.bundles(self.cfg.unlearn.seed), reference=reference)

    def _reinforced(self, inputs: RunInputs) -> Path:
        return self.reinforced or inputs.outputs["reinforce"]

    def export(self, name: str, inputs: RunInputs, staging: Path, device: torch.device) -> None:
        baseline = load_model(inputs.baseline, "baseline", device).eval()
        reinforced = load_model(self._reinforced(inputs), "reinforced", device).eval()
        labels = build_labels(baseline, reinforced, inputs.tokenizer, inputs.forget_blocks, self.anchors, self.cfg.labels)
        labels.save(staging)
        log.info("labels: %s", labels.stats)

    def summary(self, result: PhaseResult) -> TrainingSummary:
        fit, labels = result.fit, self.cfg.labels
        log.info("unlearn: best validation loss %.4f at step %d of %d", fit.best_val_loss, fit.best_step, fit.steps)
        return TrainingSummary.of(
            self.name, result, self.cfg.engine.workers, alpha=labels.alpha, forbid_anchor_keys=labels.forbid_anchor_keys,
            best_step=fit.best_step, best_val_loss=fit.best_val_loss, label_stats=result.teacher_stats,
            retain=self.cfg.loss.retain_loss if self.uses_retain else "none",
        )

    @staticmethod
    def describe(name: str, s: dict) -> str:
        changed = (s["label_stats"] or {}).get("changed_fraction", {})
        speed = s.get("throughput", {})
        engine = f"{s['workers']} DeepSpeed ZeRO-3 worker(s)" if s.get("workers") else "in-process"
        return (
            f"{name}: α = {s['alpha']:g}, anchor keys forbidden: {s['forbid_anchor_keys']}, retain term: {s.get('retain', 'none')}; kept step {s['best_step']} of {s['steps']} "
            f"(validation loss on generic labels {s['best_val_loss']:.4f}); {(s['label_stats'] or {}).get('blocks')} blocks, "
            f"labels differing from the original next token per α: {changed}; trained {engine} at "
            f"{speed.get('tokens_per_s', 0):.0f} tokens/s, waiting for labels {100 * speed.get('label_wait_fraction', 0):.1f}% of the time"
        )
