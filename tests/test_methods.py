"""The method seam: gradient ascent as a one-file method, the registry, the recipe's bugs found by users.

Gradient ascent on two ZeRO-3 workers against one process lives in test_engine.py beside WHP's.
"""

import json

import pytest
import torch

from builders import assert_one_line_error, obliviate
from configs import TrainConfig
from engine.training.objectives import AscentLoss, scores_from_logits
from engine.training.backends import TorchBackend
from engine.training.objectives import NEXT_TOKEN
from test_cli import TINY, world  # noqa: F401 - the module-scoped tiny world
from test_train import patterned_blocks, tiny_model


def test_the_ascent_loss_is_the_negated_next_token_loss_on_a_hand_worked_case():
    # Two tokens of vocabulary 2, uniform logits: each counted position costs ln 2; -100 is not counted.
    logits = torch.zeros(1, 3, 2)
    targets = torch.tensor([[0, 1, -100]])
    loss = AscentLoss()
    assert loss.units(targets, targets) == 1
    assert float(loss.loss_sum(scores_from_logits(logits, loss.labels(targets, targets)), targets, targets)) == pytest.approx(-torch.log(torch.tensor(2.0)).item())
    targets = torch.tensor([[0, 1, 0]])
    assert loss.units(targets, targets) == 2
    assert float(loss.loss_sum(scores_from_logits(logits, loss.labels(targets, targets)), targets, targets)) == pytest.approx(-2 * torch.log(torch.tensor(2.0)).item())


def test_the_first_ascent_step_reports_the_negated_golden_loss_and_raises_it():
    cfg = TrainConfig(lr=1e-2, micro_batch_size=4, grad_accum=1, val_fraction=0.0)
    blocks = patterned_blocks()[:4]
    descent = TorchBackend(tiny_model(), cfg, save_fn=lambda m, p: None, objective=NEXT_TOKEN)
    ascent = TorchBackend(tiny_model(), cfg, save_fn=lambda m, p: None, objective=AscentLoss())
    first_descent = descent.train_step([(blocks, blocks)], cfg.lr)
    first_ascent = ascent.train_step([(blocks, blocks)], cfg.lr)
    assert first_ascent.loss == pytest.approx(-first_descent.loss, rel=1e-6)
    assert first_ascent.tokens == first_descent.tokens == 4 * (blocks.shape[1] - 1)
    second = ascent.train_step([(blocks, blocks)], cfg.lr)
    assert -second.loss > -first_ascent.loss, "ascending raised the forget loss"


def test_gradient_ascent_runs_in_process_and_records_how_it_was_made(world, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    code, _, err = obliviate("unlearn", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", run, *TINY, "method=ga", "unlearn.lr=1e-3", capsys=capsys)
    assert code == 0, err
    summary = json.loads((run / "unlearned" / "obliviate_training.json").read_text())
    assert summary["method"] == "ga" and summary["steps"] == 2 and summary["final_loss"] < 0


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_whp_with_its_retain_term_trains_on_bundles_and_records_it(world, tmp_path, capsys, retain_loss):  # noqa: F811
    files, run = world["files"], tmp_path / "run"
    common = ["--baseline", world["baseline"], "--reinforced", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", run, *TINY]
    code, _, err = obliviate("unlearn", *common, "loss.whp_retain=true", capsys=capsys)
    assert_one_line_error(code, err, "loss.whp_retain needs a retain set")
    code, _, err = obliviate("unlearn", *common, "--retain", files.general, "loss.whp_retain=true", f"loss.retain_loss={retain_loss}", capsys=capsys)
    assert code == 0, err
    summary = json.loads((run / "unlearned" / "obliviate_training.json").read_text())
    assert summary["method"] == "whp" and summary["retain"] == retain_loss and summary["steps"] >= 1


def test_an_unknown_method_and_a_phase_the_method_lacks_are_one_line_errors(world, tmp_path, capsys):  # noqa: F811
    common = ["--baseline", world["baseline"], "--target", world["files"].saga, "--out", tmp_path / "run", *TINY]
    code, _, err = obliviate("unlearn", *common, "method=nope", capsys=capsys)
    assert_one_line_error(code, err, "unknown method 'nope'", "whp, ga")
    code, _, err = obliviate("reinforce", *common, "method=ga", capsys=capsys)
    assert_one_line_error(code, err, "method ga has no reinforce phase")
    assert not (tmp_path / "run").exists()


def test_resume_after_the_training_phases_finished_runs_the_evaluation(world, tmp_path, capsys):  # noqa: F811
    """A preemption during evaluation: SLURM requeues with --resume, which must evaluate, not crash."""
    run, files = tmp_path / "run", world["files"]
    common = ["--baseline", world["baseline"], "--target", files.saga, "--out", run, *TINY]
    evals = [f"eval.probes={files.probes}", "eval.tasks=[]", "eval.max_new_tokens=4", "eval.context_length=64"]
    code, _, err = obliviate("reinforce", *common, capsys=capsys)
    assert code == 0, err
    code, _, err = obliviate("unlearn", *common, "--anchors", files.anchors, capsys=capsys)
    assert code == 0, err
    code, out, err = obliviate("run", *common, "--anchors", files.anchors, *evals, "--resume", capsys=capsys)
    assert code == 0, err
    assert (run / "metrics.json").is_file() and "unlearned" in out


def test_a_loss_that_turns_non_finite_ends_in_one_line_and_publishes_nothing(world, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    args = ["--baseline", world["baseline"], "--target", world["files"].saga, "--out", run, *TINY]
    code, _, err = obliviate("reinforce", *args, "reinforce.lr=1e30", "reinforce.max_steps=4", capsys=capsys)
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("obliviate: error:")]
    assert len(errors) == 1 and "reinforce: the loss became" in errors[0], err
    assert not (run / "reinforced").exists()
