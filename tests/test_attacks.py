"""The evaluation suite's attacks: weight-only quantization really quantizes, and recovery is computed right."""

import json

import pytest
import torch
from optimum.quanto import QBitsTensor, QBytesTensor

from builders import mean_nll, obliviate, tiny_llama
from engine.evaluation.attacks import describe_recovery, quantized, recovery, relearned
from test_cli import world  # noqa: F401 - the module-scoped tiny world


def test_recovery_on_hand_made_numbers():
    baseline = {"probability_familiarity": 0.8, "memorization_accuracy": 0.9, "completion_familiarity": 4.0, "mia_auc_min_k": 0.9}
    unlearned = {"probability_familiarity": 0.1, "memorization_accuracy": 0.6, "completion_familiarity": 4.0, "mia_auc_min_k": None}
    attacked = {"probability_familiarity": 0.45, "memorization_accuracy": 0.5, "completion_familiarity": 3.0, "mia_auc_min_k": 0.7}
    found = recovery(attacked, unlearned, baseline)
    assert found["probability_familiarity"] == pytest.approx(0.5)  # half the way back to the baseline
    assert found["memorization_accuracy"] == pytest.approx(-1 / 3)  # the attack forgot more
    assert found["completion_familiarity"] is None  # unlearning did not change it
    assert found["mia_auc_min_k"] is None and found["extraction_likelihood"] is None  # not measured
    assert describe_recovery("unlearned (quant4)", found) == "unlearned (quant4): recovery toward the baseline — probability familiarity 50%, memorization accuracy -33%"


@pytest.mark.parametrize("attack, kind, bits", [("quant8", QBytesTensor, 8), ("quant4", QBitsTensor, 4)])
def test_quantization_really_quantizes_the_weights_and_the_model_still_generates(attack, kind, bits):
    model = tiny_llama(500, 0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attacked = quantized(model, attack)
    layer = attacked.model.layers[0].mlp.gate_proj
    assert isinstance(layer.weight, kind)
    stored = layer.weight._data
    raw = stored._data if bits == 4 else stored  # int4 values are packed two to a byte
    assert raw.dtype in (torch.int8, torch.uint8) and raw.numel() * raw.element_size() * 8 == layer.weight.numel() * bits
    assert not torch.equal(layer.weight.dequantize(), model.model.layers[0].mlp.gate_proj.weight)  # rounded to the grid
    for name, p in model.named_parameters():  # the evaluated model is left as it was
        assert torch.equal(p, before[name]), name
    prompt = torch.tensor([[1, 5, 9, 13]])
    out = attacked.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], prompt)


def test_relearning_fine_tunes_a_copy_and_yields_it_after_each_step_count():
    model = tiny_llama(64, 0)
    blocks = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    start = mean_nll(model, blocks)
    seen = [(steps, mean_nll(copy, blocks)) for steps, copy in relearned(model, blocks, [3, 1], lr=1e-2)]
    assert [steps for steps, _ in seen] == [1, 3]  # in order, each count once
    assert start > seen[0][1] > seen[1][1], "relearning lowers the loss on the relearned text, more with more steps"
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_eval_runs_the_attacks_on_the_unlearned_model_and_reports_recovery(world, tmp_path, capsys):  # noqa: F811
    small = ["eval.sequence_length=32", "eval.prefix_length=16", "eval.el_n=4", "eval.max_sequences=4", "eval.max_new_tokens=4", "eval.context_length=64", "eval.perturbations=0"]
    run = tmp_path / "run"
    code, out, err = obliviate(
        "eval", "--model", world["other"], "--baseline", world["baseline"], "--anchors", world["files"].anchors,
        "--suite", world["files"].suite, "--out", run, "--workers", "0", *small, "eval.attacks=[quant8,quant4,relearn]", "eval.relearn_steps=[1,2]",
        "eval.relearn_blocks=2", "eval.relearn_lr=1e-3", capsys=capsys,
    )
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    attacked = ["unlearned (quant8)", "unlearned (quant4)", "unlearned (relearn 1)", "unlearned (relearn 2)"]
    assert list(metrics["models"]) == ["baseline", "unlearned", *attacked]
    assert set(metrics["extra"]["attack_recovery"]) == set(attacked)
    assert (run / "report-relearn.png").stat().st_size > 0 and "report-relearn.png" in (run / "report.md").read_text()
    assert "unlearned (quant4): recovery toward the baseline" in (run / "report.md").read_text()
    assert "unlearned (quant8)" in out


def test_relearning_curves_gather_each_models_recovery_by_step_count():
    from engine.evaluation.report import _relearning_curves

    recovered = {
        "unlearned (relearn 4)": {"probability_familiarity": 0.5, "memorization_accuracy": None},
        "unlearned (relearn 2)": {"probability_familiarity": 0.25, "memorization_accuracy": 0.1},
        "unlearned (quant4)": {"probability_familiarity": 0.9},
        "other (v2) (relearn 1)": {"probability_familiarity": 0.0},
    }
    assert _relearning_curves(recovered) == {
        "unlearned": {"probability_familiarity": [(2, 0.25), (4, 0.5)], "memorization_accuracy": [(2, 0.1)]},
        "other (v2)": {"probability_familiarity": [(1, 0.0)]},
    }
