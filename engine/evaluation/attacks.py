"""Attacks that try to bring forgotten text back, run by the evaluation suite on each unlearned model.

Quantization (Zhang et al., ICLR 2025, "Catastrophic Failure of LLM Unlearning via Quantization"): an
unlearned model's weights often differ from the baseline's by less than a 4-bit grid step, so rounding
them to that grid restores much of what was forgotten. The suite re-evaluates a weight-only quantized
copy — `quant8` (int8) and `quant4` (int4, groups of 128 or the row) — of every linear layer, LM head
included, with optimum-quanto: it quantizes weight-only to 8 and 4 bits on CPU and on GPU with the same
code (bitsandbytes' int8/NF4 need CUDA, torchao's int4 needs CUDA kernels), so the CPU suite runs the very
attack a GPU user would. Its first 4-bit use on a machine compiles a small CPU extension (~25 s, cached).
"""

from __future__ import annotations

import copy

ATTACKS = ("quant8", "quant4")
RECOVERED = ("probability_familiarity", "completion_familiarity", "memorization_accuracy", "extraction_likelihood", "verbatim_rouge", "mia_auc_min_k")


def quantized(model, attack: str):
    """A weight-only quantized copy of `model` (which stays as it is)."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    attacked = copy.deepcopy(model)
    quantize(attacked, weights={"quant8": qint8, "quant4": qint4}[attack])
    freeze(attacked)
    return attacked.eval()


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
