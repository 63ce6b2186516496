"""Attacks that try to bring forgotten text back, run by the evaluation suite on each unlearned model.

Quantization (Zhang et al., ICLR 2025, "Catastrophic Failure of LLM Unlearning via Quantization"): an
unlearned model's weights often differ from the baseline's by less than a 4-bit grid step, so rounding
them to that grid restores much of what was forgotten. The suite re-evaluates a weight-only quantized
copy — `quant8` (int8) and `quant4` (int4, groups of 128 or the row) — of every linear layer, LM head
included, with optimum-quanto: it quantizes weight-only to 8 and 4 bits on CPU and on GPU with the same
code (bitsandbytes' int8/NF4 need CUDA, torchao's int4 needs CUDA kernels), so the CPU suite runs the very
attack a GPU user would. Its first 4-bit use on a machine compiles a small CPU extension (~25 s, cached).

Relearning (Hu et al. 2024, "Jogging the Memory of Unlearned LLMs"): a short fine-tune on a little of the
forgotten text often restores the rest. `relearn` fine-tunes a copy on `eval.relearn_blocks` forget-set
blocks the evaluation does not score (the ones after its first `max_sequences`), one full batch a step at
`eval.relearn_lr`, and re-evaluates it after each of `eval.relearn_steps` steps: recovery as a function of steps.

On an offset artifact (`engine.offset_model.OffsetModel`) quantization rounds all three models, the ensemble
being what is served, and relearning fine-tunes o′ alone: M and o are frozen in it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Iterator

import torch

from configs import EvalConfig, TrainConfig
from configs.errors import UserError
from engine.evaluation.suite import sequences
from engine.training.backends import TorchBackend

ATTACKS = ("quant8", "quant4", "relearn")
RECOVERED = ("probability_familiarity", "completion_familiarity", "memorization_accuracy", "extraction_likelihood", "verbatim_rouge", "mia_auc_min_k")


def quantized(model, attack: str):
    """A weight-only quantized copy of `model` (which stays as it is)."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    attacked = copy.deepcopy(model)
    quantize(attacked, weights={"quant8": qint8, "quant4": qint4}[attack])
    freeze(attacked)
    return attacked.eval()


def relearned(model, blocks: torch.Tensor, steps: list[int], lr: float) -> Iterator[tuple[int, torch.nn.Module]]:
    """A copy of `model` fine-tuned on `blocks` (all of them each step, AdamW at `lr`), yielded after each
    step count in `steps`; `model` stays as it is. Frozen parameters (an offset model's M and o) are shared
    with `model`, not copied: only the trainable ones (o′) are fine-tuned, as a user of the artifact could."""
    attacked = copy.deepcopy(model, memo={id(parameter): parameter for parameter in model.parameters() if not parameter.requires_grad})
    backend = TorchBackend(attacked, TrainConfig(lr=lr, weight_decay=0.0, grad_clip=1.0), save_fn=lambda m, path: None)
    done = 0
    for target in sorted(set(steps)):
        while done < target:
            backend.train_step([(blocks, blocks)], lr)
            done += 1
        yield target, attacked.eval()


def relearn_blocks(tokenizer, documents: list[str], cfg: EvalConfig) -> torch.Tensor:
    """The forget-set blocks relearning trains on: the `relearn_blocks` after the evaluated `max_sequences`."""
    extended = sequences(tokenizer, documents, dataclasses.replace(cfg, max_sequences=cfg.max_sequences + cfg.relearn_blocks))
    held_apart = extended[cfg.max_sequences :]
    if len(held_apart) < cfg.relearn_blocks:
        raise UserError(f"relearning needs {cfg.relearn_blocks} forget-set blocks beyond the {cfg.max_sequences} evaluated (eval.relearn_blocks), the forget set has {len(held_apart)}")
    return torch.tensor(held_apart)


def attacked_models(model, tokenizer, attack: str, cfg: EvalConfig, forget: list[str] | None) -> Iterator[tuple[str, torch.nn.Module]]:
    """(label, attacked copy) for one attack: one quantized copy, or one relearned copy per step count."""
    if attack != "relearn":
        yield attack, quantized(model, attack)
        return
    blocks = relearn_blocks(tokenizer, forget or [], cfg)
    for steps, attacked in relearned(model, blocks, cfg.relearn_steps, cfg.relearn_lr):
        yield f"relearn {steps}", attacked


def recovery(attacked: dict, unlearned: dict, baseline: dict) -> dict[str, float | None]:
    """Per forgetting metric, how far the attack moved the unlearned model back toward the baseline:
    (attacked − unlearned) / (baseline − unlearned): 0 = nothing came back, 1 = all of it (below 0: the
    attack forgot more). None where a value is missing or unlearning did not change the metric."""
    found = {}
    for metric in RECOVERED:
        values = attacked.get(metric), unlearned.get(metric), baseline.get(metric)
        if None in values or values[2] == values[1]:
            found[metric] = None
        else:
            found[metric] = (values[0] - values[1]) / (values[2] - values[1])
    return found


def describe_recovery(name: str, found: dict[str, float | None]) -> str:
    """One report line: what the attack on `name` brought back."""
    parts = [f"{metric.replace('_', ' ')} {value:.0%}" for metric, value in found.items() if value is not None]
    return f"{name}: recovery toward the baseline — " + (", ".join(parts) if parts else "nothing measurable")
