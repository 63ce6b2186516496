"""The training loop: golden losses of the first steps, best-checkpoint selection, the loss convention, resuming."""

import pytest
import torch

from builders import tiny_llama
from configs import TrainConfig
from engine.models import IGNORE_INDEX
from engine.training.backends import TorchBackend
from engine.training.loop import fit
from engine.training.objectives import causal_lm_loss_sum
from engine.training.schedule import Schedule, lr_at, pad_blocks

# First five optimizer steps of `tiny_run` below (torch 2.13 CPU, fp32). A change here means the
# loop, the loss, the schedule or the optimizer changed: update only when that was the intent.
GOLDEN_LOSSES = [4.15467, 4.12898, 4.10934, 3.95972, 3.93711]


def tiny_model():
    """The shape GOLDEN_LOSSES were pinned on: full key/value heads, 64 positions."""
    return tiny_llama(64, 0, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)


def patterned_blocks(n_blocks=24, length=16, vocab=64):
    """Counting sequences with a per-block stride: learnable, and not trivially constant."""
    start = torch.arange(n_blocks).unsqueeze(1)
    stride = (torch.arange(n_blocks) % 5 + 1).unsqueeze(1)
    return (start + stride * torch.arange(length)) % vocab


def tiny_run(steps=5, **overrides):
    cfg = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=4, grad_accum=2, max_steps=steps, warmup_steps=2, val_fraction=0.0, seed=0, **overrides)
    model = tiny_model()
    saved = []
    backend = TorchBackend(model, cfg, save_fn=lambda m, path: saved.append(path))
    ids = patterned_blocks()
    return fit(backend, ids, ids, cfg, keep_best=False, desc="golden"), saved


def test_golden_losses_of_the_first_steps():
    torch.set_num_threads(1)
    result, _ = tiny_run()
    assert result.steps == 5
    assert result.losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4)


def test_loss_sum_skips_ignored_labels_and_shifts():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 2 confidently
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])
    loss, count = causal_lm_loss_sum(logits, labels)
    assert count == 1
    assert float(loss) == pytest.approx(-torch.log_softmax(logits[0, 0], -1)[2].item())


def test_gradient_accumulation_matches_one_big_micro_batch():
    """Token-weighted loss: 2 micro-batches of 4 blocks train exactly like 1 of 8."""
    split, _ = tiny_run(steps=3)
    cfg = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=8, grad_accum=1, max_steps=3, warmup_steps=2, val_fraction=0.0, seed=0)
    backend = TorchBackend(tiny_model(), cfg, save_fn=lambda m, p: None)
    ids = patterned_blocks()
    whole = fit(backend, ids, ids, cfg, keep_best=False)
    assert whole.losses == pytest.approx(split.losses, rel=1e-5)


def test_keep_best_saves_at_the_lowest_validation_loss(tmp_path):
    cfg = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=4, grad_accum=1, max_steps=6, eval_every=2, val_fraction=0.2, seed=0)
    saved = []
    backend = TorchBackend(tiny_model(), cfg, save_fn=lambda m, path: saved.append(path))
    ids = patterned_blocks()
    result = fit(backend, ids, ids, cfg, save_to=tmp_path / "best", keep_best=True)
    steps = [s for s, _ in result.val_losses]
    assert steps == [0, 2, 4, 6]
    best_step, best = min(result.val_losses, key=lambda sv: sv[1])
    assert (result.best_step, result.best_val_loss) == (best_step, best)
    improvements = sum(1 for i, (_, v) in enumerate(result.val_losses) if v == min(x for _, x in result.val_losses[: i + 1]))
    assert len(saved) == improvements


def test_split_is_seeded_and_disjoint():
    cfg = TrainConfig(val_fraction=0.1, seed=3, micro_batch_size=2, grad_accum=1)
    a, b = Schedule.make(20, cfg, 1), Schedule.make(20, cfg, 1)
    assert torch.equal(a.val_ids, b.val_ids) and a.val_ids.numel() == 2 and a.train_ids.numel() == 18
    assert sorted(a.train_ids.tolist() + a.val_ids.tolist()) == list(range(20))


def test_schedule_shares_each_step_between_ranks_independently_of_the_world_size():
    """2 ranks × 4 blocks see exactly the blocks 1 rank × 8 sees, step by step, across epoch boundaries."""
    one = Schedule.make(19, TrainConfig(micro_batch_size=8, grad_accum=1, epochs=3, val_fraction=0.0), 1)
    two = Schedule.make(19, TrainConfig(micro_batch_size=4, grad_accum=1, epochs=3, val_fraction=0.0), 2)
    assert one.total_steps == two.total_steps == 9
    for (s1, ids1), (s2, ids2) in zip(one.steps(), two.steps()):
        assert s1 == s2 and torch.equal(ids1, torch.cat([two.share(ids2, 0), two.share(ids2, 1)]))
    assert [s for s, _ in two.steps(first_step=7)] == [7, 8]
    requests = list(two.requests(first_step=7))
    assert len(requests) == 3 and [r.numel() for r in requests[0]] == [0, 0]  # validation first (none here)


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, 20, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(20, 20, cfg) == pytest.approx(0.1)


class Scalars:
    """A tensorboard-writer stand-in recording what fit() logs, and at which steps."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        name = tag.split("/")[-1]
        self.values.setdefault(name, []).append(value)
        self.steps.setdefault(name, []).append(step)


class StopAfter:
    """A stop flag (like a threading.Event set by a signal handler) that turns on at fit()'s n-th check."""

    def __init__(self, n: int):
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n


# 19 training blocks, 8 per step: step 3 spans two epochs; validation every 2 steps records a best.
RESUME_CFG = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=4, grad_accum=2, max_steps=6, warmup_steps=2, val_fraction=0.2, eval_every=2, seed=0)


def _resume_fit(**kwargs):
    model = tiny_model()
    ids = patterned_blocks()
    return fit(TorchBackend(model, RESUME_CFG, save_fn=lambda m, p: None), ids, ids, RESUME_CFG, **kwargs), model


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    whole, whole_model = _resume_fit()
    first, _ = _resume_fit(checkpoint_dir=tmp_path, checkpoint_every=2, stop=StopAfter(3))
    assert first.interrupted and first.steps == 3
    assert (tmp_path / "latest").read_text() == "step-3"
    assert sorted(d.name for d in tmp_path.iterdir()) == ["latest", "step-2", "step-3"]
    (tmp_path / "step-5.partial").mkdir()  # leftovers of a crash: never loaded
    (tmp_path / "step-4").mkdir()
    scalars = Scalars()
    resumed, resumed_model = _resume_fit(checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, writer=scalars)
    assert not resumed.interrupted and resumed.steps == 6
    assert scalars.steps["loss"] == [4, 5, 6]
    assert resumed.losses == whole.losses
    assert resumed.val_losses == whole.val_losses
    assert (resumed.best_step, resumed.best_val_loss) == (whole.best_step, whole.best_val_loss)
    for name, value in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=1e-6)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["latest", "step-4", "step-6"]


def test_resume_without_a_complete_checkpoint_starts_fresh(tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "step-2.partial").mkdir()
    (tmp_path / "step-4").mkdir()  # renamed, but `latest` was never pointed at it
    whole, _ = _resume_fit()
    scalars = Scalars()
    fresh, _ = _resume_fit(checkpoint_dir=tmp_path, resume=True, writer=scalars)
    assert fresh.losses == whole.losses
    assert scalars.steps["loss"] == [1, 2, 3, 4, 5, 6]


def test_validation_shards_are_padded_to_the_same_size():
    schedule = Schedule.make(25, TrainConfig(val_fraction=0.2), 2)
    shares = [schedule.val_share(rank) for rank in range(2)]
    assert [s.numel() for s in shares] == [3, 2] and torch.equal(torch.cat(shares), schedule.val_ids)
    ids = torch.arange(4).reshape(2, 2)
    padded_ids, padded_labels = pad_blocks(ids, ids, schedule.val_share_size)
    assert padded_ids.shape == (3, 2) and torch.equal(padded_labels[:2], ids) and (padded_labels[2] == IGNORE_INDEX).all()
