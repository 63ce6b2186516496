"""Offset unlearning's training path: M and o frozen, o′ trained, the ensemble scored by the fused kernel.

- at o′ = o the ensemble is M: the same per-token log-probabilities, KL 0, and offset-ga's / offset-npo's /
  offset-graddiff's first step reports the loss ga / npo / graddiff report on M;
- a step changes o′ only, and steps lower the objective;
- in process through the CLI: the offset artifact (o′ + offset.json), o′ alone in the checkpoints (its
  evaluation: tests/test_offset_model.py);
- 2 ZeRO-3 Ray workers × micro-batch b = 1 process × 2b (o′'s weights), every parameter partitioned, o′
  alone in DeepSpeed's checkpoint;
- bad input: foreign tokenizer or vocabulary, α ≤ 0 or not finite, no o: one line, exit 2.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders import assert_one_line_error, obliviate, tiny_llama
from configs import TrainConfig
from engine.data.tiny import tiny_llama as world_llama
from engine.models import load_tokenizer, save_model
from engine.training.backends import LogitScorer, TorchBackend
from engine.training.objectives import AscentLoss, GradDiffLoss, NPOLoss, next_token_log_probs
from engine.offset_model import OFFSET_RECORD
from engine.training.offset import OffsetEnsemble, OffsetHead, OffsetScorer
from test_cli import derive_world, make_model_dir
from test_engine import COMMON, ENGINE, REFERENCE, assert_same_weights, cluster, summary, world  # noqa: F401 - module fixtures
from test_train import patterned_blocks, tiny_model
from test_unlearning_losses import GOLDEN_FIRST

CFG = TrainConfig(lr=1e-2, micro_batch_size=4, grad_accum=1, val_fraction=0.0)


def small_model():
    """o: narrower than test_train's tiny model (M), the same 64-token vocabulary."""
    return tiny_llama(64, 1, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)


def offset_backend(objective, retain_kl=False):
    """(TorchBackend training o′ = a copy of o in the ensemble with M, M, o, o′)."""
    big, small = tiny_model(), small_model()
    trained = copy.deepcopy(small)
    ensemble = OffsetEnsemble(Path("M"), Path("o"), 1.0, retain_kl)
    backend = TorchBackend(OffsetHead(trained, ensemble), CFG, save_fn=lambda m, p: None, objective=objective, scorer=OffsetScorer(big, small, ensemble))
    return backend, big, small, trained


def direct_first_step(objective, batch, reference=None):
    return TorchBackend(tiny_model(), CFG, save_fn=lambda m, p: None, objective=objective, scorer=LogitScorer(reference)).train_step([batch], CFG.lr).loss


def test_at_initialization_the_ensemble_scores_like_the_baseline():
    forget = patterned_blocks()[:4]
    bundles = torch.stack([forget, patterned_blocks()[4:8]], dim=1)
    backend, big, _, _ = offset_backend(AscentLoss(), retain_kl=True)
    with torch.no_grad():
        scores = backend.scorer(backend.model, bundles, bundles)
        want = next_token_log_probs(big(bundles.flatten(0, 1)).logits, bundles.flatten(0, 1)).view(4, 2, -1)
    torch.testing.assert_close(scores.log_probs, want, rtol=1e-5, atol=1e-5)
    assert scores.retain_kl.shape == (4, 15) and scores.retain_kl.abs().max() < 1e-5  # KL(M ‖ ensemble) = 0


def test_first_offset_steps_report_the_direct_methods_losses_on_the_baseline():
    forget, retain = patterned_blocks()[:4], patterned_blocks()[4:8]
    bundles = torch.stack([forget, retain], dim=1)
    with torch.no_grad():
        reference = next_token_log_probs(tiny_model()(forget).logits, forget).sum(-1)[:, None]  # NPO's teacher: M
    cases = {
        "ga": (AscentLoss(), (forget, forget), False),
        "npo+retain": (NPOLoss(beta=0.1, retain_weight=1.0), (bundles, reference), False),
        "graddiff-kl": (GradDiffLoss(1.0, retain_kl=True), (bundles, bundles), True),
    }
    for name, (objective, batch, retain_kl) in cases.items():
        offset = offset_backend(objective, retain_kl)[0].train_step([batch], CFG.lr).loss
        direct = direct_first_step(objective, batch, tiny_model() if retain_kl else None)
        assert offset == pytest.approx(direct, rel=1e-5), name
        if name in GOLDEN_FIRST:
            assert offset == pytest.approx(GOLDEN_FIRST[name], rel=1e-4), name


def test_steps_train_only_the_trainable_copy_and_lower_the_objective():
    forget = patterned_blocks()[:4]
    backend, big, small, trained = offset_backend(AscentLoss())
    frozen = [copy.deepcopy(model.state_dict()) for model in (big, small)]
    losses = [backend.train_step([(forget, forget)], CFG.lr).loss for _ in range(4)]
    assert losses[-1] < losses[0], losses
    for model, before in zip((big, small), frozen):
        assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items()), "a frozen model changed"
    assert any(not torch.equal(value, trained.state_dict()[name]) for name, value in small.state_dict().items()), "o′ did not train"


@pytest.fixture(scope="module")
def pair(world, tmp_path_factory):  # noqa: F811
    """o for the engine world's baseline: its tokenizer, a narrower Llama (and variants for bad input)."""
    root, tokenizer = tmp_path_factory.mktemp("offset"), load_tokenizer(world["baseline"], "baseline")
    narrow = derive_world(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    save_model(world_llama(narrow, len(tokenizer)), tokenizer, root / "small")
    save_model(world_llama(narrow, len(tokenizer) + 8), tokenizer, root / "wider-vocabulary")
    return {"small": root / "small", "wider-vocabulary": root / "wider-vocabulary", "foreign": make_model_dir(root / "foreign", [world["files"].general], 400)}


def test_offset_npo_in_process_publishes_the_offset_artifact(world, pair, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    args = ["--baseline", world["baseline"], "--target", world["files"].saga, "--retain", world["files"].general, "--out", run, "method=offset-npo", f"offset.small={pair['small']}", "offset.alpha=2", "loss.retain_loss=kl"]
    code, _, err = obliviate("unlearn", *args, *COMMON, *REFERENCE, "unlearn.val_fraction=0", "engine.checkpoint_every=4", "engine.keep_checkpoints=true", capsys=capsys)
    assert code == 0, err
    artifact = run / "unlearned"
    record = json.loads((artifact / OFFSET_RECORD).read_text())
    assert record == {"baseline": str(Path(world["baseline"]).resolve()), "small": str(pair["small"].resolve()), "alpha": 2.0}
    trained = AutoModelForCausalLM.from_pretrained(artifact)
    assert trained.config.hidden_size == 16 and (artifact / "tokenizer.json").is_file()  # o′, not M
    made = summary(run)
    assert (made["method"], made["alpha"], made["retain"], made["steps"]) == ("offset-npo", 2.0, "kl", 8)
    checkpointed = torch.load(run / "checkpoints" / "unlearn" / "step-8" / "backend.pt", weights_only=True)["model"]
    assert checkpointed.keys() == {f"trained.{name}" for name in trained.state_dict()}  # o′ alone, not M or o



def test_offset_on_two_zero3_workers_trains_like_one_process_with_twice_the_batch(world, pair, cluster, tmp_path, capsys):  # noqa: F811
    """offset-npo with its reference teacher, retain bundles and the KL to M: every parameter partitioned,
    so o′'s head reaches the kernel gathered as an external parameter and M's and o's heads are gathered copies."""
    shard_all = tmp_path / "shard-all.json"
    shard_all.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    args = ["--baseline", world["baseline"], "--target", world["files"].saga, "--retain", world["files"].general, "method=offset-npo", f"offset.small={pair['small']}", "loss.retain_loss=kl", "unlearn.val_fraction=0", "unlearn.lr=3e-4"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    code, _, err = obliviate("unlearn", *args, "--out", reference, *COMMON, *REFERENCE, capsys=capsys)
    assert code == 0, err
    code, _, err = obliviate("unlearn", *args, "--out", run, *COMMON, *ENGINE, f"engine.deepspeed={shard_all}", capsys=capsys)
    assert code == 0, err
    got, want = summary(run), summary(reference)
    assert got["workers"] == 2 and got["steps"] == want["steps"] and got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)
    assert_same_weights(run, reference)
    assert json.loads((run / "unlearned" / OFFSET_RECORD).read_text()) == json.loads((reference / "unlearned" / OFFSET_RECORD).read_text())
    states = torch.load(run / "checkpoints" / "unlearn" / "step-8" / "zero" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    shapes = {name: tuple(shape) for group in states["param_shapes"] for name, shape in group.items()}
    assert shapes == {f"trained.{name}": tuple(value.shape) for name, value in AutoModelForCausalLM.from_pretrained(pair["small"]).state_dict().items()}  # o′ alone


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (["offset.small={foreign}"], "the baseline and offset.small models use different tokenizers"),
        (["offset.small={wider-vocabulary}"], "different vocabularies"),
        (["offset.small={small}", "offset.alpha=0"], "offset.alpha must be > 0"),
        (["offset.small={small}", "offset.alpha=-1"], "offset.alpha must be > 0"),
        (["offset.small={small}", "offset.alpha=inf"], "offset.alpha must be a finite number"),
        ([], "method offset-ga needs offset.small"),
        (["offset.small={missing}"], "offset.small model not found"),
    ],
)
def test_bad_offset_input_is_one_line(world, pair, tmp_path, capsys, settings, fragment):  # noqa: F811
    paths = {**pair, "missing": tmp_path / "nope"}
    run = tmp_path / "run"
    given = [setting.format(**paths) for setting in settings]
    code, _, err = obliviate("unlearn", "--baseline", world["baseline"], "--target", world["files"].saga, "--out", run, "method=offset-ga", *given, *COMMON, *REFERENCE, capsys=capsys)
    assert_one_line_error(code, err, fragment)
    assert not run.exists()
