"""The direct and memorization-aware methods' losses and training rules, without Ray.

Each loss on a hand-worked case, golden first steps from the same tiny model as test_train.py's, SGA on a
planted forget set, and task arithmetic. The 2-ranks-=-1-rank equivalences run in test_engine.py.
"""

import math

import pytest
import torch

from configs import TrainConfig
from engine.training.backends import TorchBackend
from engine.training.loop import fit
from engine.training.objectives import NEXT_TOKEN, AscentLoss, GradDiffLoss, NPOLoss, RetainedNextTokenLoss, SimNPOLoss, memorization_scores, next_token_kl, next_token_log_probs, scores_from_logits
from engine.training.schedule import Schedule, pad_blocks
from engine.training.selection import MemorizationSelection
from test_train import patterned_blocks, tiny_model

LN2 = math.log(2)


def loss_of(objective, logits, ids, targets, reference=None):
    """`objective.loss_sum` on the scores a model with these logits gets (the backends' direct path)."""
    return objective.loss_sum(scores_from_logits(logits, objective.labels(ids, targets), reference), ids, targets)


def test_next_token_log_probs_are_zero_at_ignored_positions():
    logits = torch.zeros(2, 3, 2)  # uniform over 2 tokens: each counted position is ln ½
    labels = torch.tensor([[0, 1, 1], [0, -100, 1]])
    torch.testing.assert_close(next_token_log_probs(logits, labels), torch.tensor([[-LN2, -LN2], [0.0, -LN2]]))


def test_graddiff_ascends_on_forget_and_descends_on_retain():
    logits = torch.zeros(1, 2, 3, 2)  # one bundle: forget row, retain row, both uniform
    ids = torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    loss = GradDiffLoss(retain_weight=0.5)
    assert loss.units(ids, ids) == 2  # the forget tokens
    assert float(loss_of(loss, logits, ids, ids)) == pytest.approx(-2 * LN2 + 0.5 * 2 * LN2)


def test_the_kl_retain_term_on_hand_worked_distributions():
    # One bundle over a vocabulary of 2, 3 positions (2 counted). The model is uniform; the reference puts
    # 3/4 on token 0: KL(q ‖ uniform) = 0.75·ln 1.5 + 0.25·ln 0.5 per position.
    logits, ids = torch.zeros(1, 2, 3, 2), torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    reference = torch.tensor([math.log(3.0), 0.0]).expand(1, 3, 2)
    per_position = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(next_token_kl(logits[:, 1], reference).sum(-1)[0]) == pytest.approx(2 * per_position)
    assert float(next_token_kl(reference, reference).sum(-1)[0]) == pytest.approx(0.0, abs=1e-7)  # identical distributions
    loss = GradDiffLoss(retain_weight=0.5, retain_kl=True)
    assert float(loss_of(loss, logits, ids, ids, reference)) == pytest.approx(-2 * LN2 + 0.5 * 2 * per_position)
    same = loss_of(loss, logits, ids, ids, logits[:, 1])
    assert float(same) == pytest.approx(-2 * LN2)  # KL of identical distributions = 0: GA alone
    npo = loss_of(NPOLoss(beta=0.1, retain_weight=1.0), logits, ids, torch.tensor([[-2 * LN2]]), reference)
    assert float(npo) == pytest.approx(20 * LN2 + per_position)  # per-sequence: the retain row's mean KL


def test_whp_retain_term_adds_the_retain_rows_nll_or_kl_to_the_label_loss():
    # One bundle, uniform logits over 2 tokens: the generic-label CE is ln 2 per labelled position (2 of the
    # forget row's 3 positions are labelled, one ignored), the retain NLL ln 2 at each of its 2 positions.
    logits, ids = torch.zeros(1, 2, 3, 2), torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    labels = torch.tensor([[0, 1, -100]])
    loss = RetainedNextTokenLoss(retain_weight=0.5)
    assert loss.units(ids, labels) == 1
    assert float(loss_of(loss, logits, ids, labels)) == pytest.approx(LN2 + 0.5 * 2 * LN2)
    reference = torch.tensor([math.log(3.0), 0.0]).expand(1, 3, 2)
    per_position = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(loss_of(loss, logits, ids, labels, reference)) == pytest.approx(LN2 + 0.5 * 2 * per_position)
    padding = torch.full((1, 3), -100)
    assert float(loss_of(loss, logits, ids, padding)) == 0.0  # a padding row adds nothing


def test_npo_on_hand_worked_sequences():
    # Uniform logits over 2 tokens, 3 positions: log p_θ(y) = −2 ln 2 for every row.
    logits, ids = torch.zeros(3, 3, 2), torch.tensor([[0, 1, 1]] * 3)
    reference = torch.tensor([[-2 * LN2], [-2 * LN2 + 1.0], [float("nan")]])  # equal; higher by 1; a padding row
    loss = NPOLoss(beta=0.1)
    assert loss.units(ids, reference) == 2
    equal = (2 / 0.1) * LN2  # −(2/β)·log σ(0)
    below = -(2 / 0.1) * math.log(1 / (1 + math.exp(-0.1)))  # −(2/β)·log σ(−β·(−1))
    assert float(loss_of(loss, logits, ids, reference)) == pytest.approx(equal + below)
    # With a retain term, each valid bundle adds w · its retain row's mean NLL (ln 2 here).
    bundles = torch.stack([ids, ids], dim=1)
    with_retain = loss_of(NPOLoss(beta=0.1, retain_weight=2.0), torch.zeros(3, 2, 3, 2), bundles, reference)
    assert float(with_retain) == pytest.approx(equal + below + 2 * 2.0 * LN2)


def test_simnpo_is_length_normalised_and_reference_free():
    # log p/|y| = −ln 2, β = 1, γ = 0: −2·log σ(ln 2) = −2·log(2/3); γ = 0.5 shifts the sigmoid's argument.
    logits, ids = torch.zeros(2, 3, 2), torch.tensor([[0, 1, 1], [0, 1, 1]])
    targets = ids.clone()
    targets[1] = -100  # a padding row counts nothing
    assert SimNPOLoss(beta=1.0, gamma=0.0).units(ids, targets) == 1
    assert float(loss_of(SimNPOLoss(beta=1.0, gamma=0.0), logits, ids, targets)) == pytest.approx(-2 * math.log(2 / 3))
    shifted = -2 * math.log(1 / (1 + math.exp(-(LN2 - 0.5))))
    assert float(loss_of(SimNPOLoss(beta=1.0, gamma=0.5), logits, ids, targets)) == pytest.approx(shifted)


def test_padding_rows_of_value_targets_are_nan_and_count_nothing():
    ids, targets = pad_blocks(torch.ones(1, 2, 4, dtype=torch.long), torch.tensor([[-1.5]]), 3)
    assert ids.shape == (3, 2, 4) and not ids[1:].any()
    assert targets[1:].isnan().all() and NPOLoss(beta=0.1).units(ids, targets) == 1


def _first_step(objective, micro_batches):
    cfg = TrainConfig(lr=1e-2, micro_batch_size=4, grad_accum=1, val_fraction=0.0)
    return TorchBackend(tiny_model(), cfg, save_fn=lambda m, p: None, objective=objective).train_step(micro_batches, cfg.lr)


# First-step losses on test_train.py's tiny model and patterned blocks (forget = blocks 0-3, retain = 4-7),
# pinned from the first run and checked against what each formula says they must be.
GOLDEN_FIRST = {"ga": -4.156642, "graddiff": -0.0022563, "npo": 13.862944, "npo+retain": 18.017330, "simnpo": 10.135178, "simnpo+retain": 14.289563}


def test_golden_first_step_losses_per_method():
    blocks = patterned_blocks()
    forget, retain = blocks[:4], blocks[4:8]
    bundles = torch.stack([forget, retain], dim=1)
    with torch.no_grad():
        reference = next_token_log_probs(tiny_model()(forget).logits, forget).sum(-1)[:, None]  # the frozen baseline: θ at step 0
    cases = {
        "ga": (AscentLoss(), forget, forget),
        "graddiff": (GradDiffLoss(1.0), bundles, bundles),
        "npo": (NPOLoss(beta=0.1), forget, reference),
        "npo+retain": (NPOLoss(beta=0.1, retain_weight=1.0), bundles, reference),
        "simnpo": (SimNPOLoss(beta=0.1, gamma=0.0), forget, forget),
        "simnpo+retain": (SimNPOLoss(beta=0.1, gamma=0.0, retain_weight=1.0), bundles, bundles),
    }
    first = {name: _first_step(objective, [(ids, targets)]).loss for name, (objective, ids, targets) in cases.items()}
    assert first == pytest.approx(GOLDEN_FIRST, rel=1e-4, abs=1e-6)
    nll_forget, nll_retain = _first_step(NEXT_TOKEN, [(forget, forget)]).loss, _first_step(NEXT_TOKEN, [(retain, retain)]).loss
    assert first["ga"] == pytest.approx(-nll_forget)  # the sign of GA
    assert first["graddiff"] == pytest.approx(-nll_forget + nll_retain, abs=1e-6)
    assert first["npo"] == pytest.approx((2 / 0.1) * LN2, rel=1e-6)  # θ = θ_ref at step 0: (2/β)·ln 2 per sequence
    assert first["npo+retain"] == pytest.approx(first["npo"] + nll_retain, rel=1e-6)
    # equal-length blocks: the per-sequence mean log-probability is the token mean
    assert first["simnpo"] == pytest.approx(-(2 / 0.1) * math.log(1 / (1 + math.exp(-0.1 * nll_forget))), rel=1e-5)


def _memorize(model, blocks, steps=40):
    cfg = TrainConfig(lr=1e-2, epochs=1000, micro_batch_size=8, grad_accum=1, max_steps=steps, val_fraction=0.0)
    fit(TorchBackend(model, cfg, save_fn=lambda m, p: None), blocks, blocks, cfg, keep_best=False, desc="memorize")
    return model


def test_sga_ascends_only_on_the_memorized_blocks_of_a_planted_forget_set():
    blocks = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    memorized = set(range(8))
    model = _memorize(tiny_model(), blocks[:8])
    with torch.no_grad():
        g = memorization_scores(model(blocks).logits, blocks, 4)
    assert (g[:8] > 0.9).all() and (g[8:] < 0.3).all(), g  # the plant took
    cfg = TrainConfig(lr=1e-4, epochs=1, micro_batch_size=4, grad_accum=1, val_fraction=0.0)  # one epoch: one scoring
    selection = MemorizationSelection(prefix_length=4, threshold=0.7, stop_level=0.0)
    result = fit(TorchBackend(model, cfg, save_fn=lambda m, p: None, objective=AscentLoss()), blocks, blocks, cfg, keep_best=False, selection=selection)
    assert set(result.selected) == memorized and result.memorization[0][2] == 8
    expected = [len(memorized & set(ids.tolist())) for _, ids in Schedule.make(16, cfg, 1).steps()]
    assert result.touched == expected and sum(expected) == 8
    assert result.tokens == sum(expected) * 15, "the loss counted the selected blocks' tokens only"


def test_selection_keeps_the_most_memorized_block_and_stops_below_the_level():
    selection = MemorizationSelection(prefix_length=4, threshold=0.7, stop_level=0.3)
    decision = selection.decide(torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64), torch.tensor([4, 6, 7]), 8, 0.3)
    assert decision.selected.nonzero().squeeze(1).tolist() == [6] and decision.mean_score == pytest.approx(0.8 / 3)
    assert decision.stop


def test_sga_stops_once_the_mean_memorization_falls_below_the_level():
    blocks = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(lr=1e-4, epochs=5, micro_batch_size=4, grad_accum=1, val_fraction=0.0)
    backend = TorchBackend(tiny_model(), cfg, save_fn=lambda m, p: None, objective=AscentLoss())
    result = fit(backend, blocks, blocks, cfg, keep_best=False, selection=MemorizationSelection(4, 0.7, stop_level=0.5))
    assert result.stopped_early and result.steps == 0 and result.memorization[0][1] < 0.5  # an untrained model memorized nothing


def test_task_arithmetic_moves_away_from_the_fine_tuned_weights(tmp_path):
    reference, tuned = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    reference.save_pretrained(tmp_path / "ref")
    backend = TorchBackend(tuned, TrainConfig(), save_fn=lambda m, p: None)
    backend.extrapolate_from(tmp_path / "ref", 3.0)
    for (name, got), want in zip(tuned.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want - 3.0 * 0.01, msg=name)  # θ_ref − λ·(θ − θ_ref), θ − θ_ref = 0.01


def test_a_resumed_sga_phase_selects_and_ends_like_an_uninterrupted_one(tmp_path):
    """The selection between re-scorings lives in the checkpoint: resuming mid-interval neither re-scores
    early nor forgets what was selected."""
    from test_train import StopAfter

    blocks = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    start = _memorize(tiny_model(), blocks[:8]).state_dict()
    cfg = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=4, grad_accum=1, max_steps=6, val_fraction=0.0)
    selection = MemorizationSelection(prefix_length=4, threshold=0.7, stop_level=0.0, every=2)

    def run(**kwargs):
        model = tiny_model()
        model.load_state_dict(start)
        backend = TorchBackend(model, cfg, save_fn=lambda m, p: None, objective=AscentLoss())
        return fit(backend, blocks, blocks, cfg, keep_best=False, selection=selection, **kwargs), model

    whole, whole_model = run()
    first, _ = run(checkpoint_dir=tmp_path, checkpoint_every=2, stop=StopAfter(3))
    assert first.interrupted and first.steps == 3  # between the re-scorings of steps 2 and 4
    resumed, resumed_model = run(checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    assert len(whole.memorization) == 3 and resumed.memorization == whole.memorization
    assert resumed.touched == whole.touched and resumed.losses == pytest.approx(whole.losses, rel=1e-6)
    for name, value in whole_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=1e-6)


def test_the_reference_teacher_streams_each_blocks_log_probability_without_logits():
    from engine.data.corpus import Block
    from engine.methods.reference import ReferenceScorer

    model, blocks = tiny_model(), patterned_blocks()[:5]
    scorer = ReferenceScorer(model, [Block("", row.tolist(), []) for row in blocks], batch_size=2)
    got = scorer(torch.tensor([3, 0, 3]))
    with torch.no_grad():
        want = next_token_log_probs(model(blocks).logits, blocks).sum(-1)
    assert got.shape == (3, 1) and got.dtype == torch.float32
    torch.testing.assert_close(got[:, 0], want[[3, 0, 3]], rtol=1e-5, atol=1e-4)
    assert sorted(scorer.cache) == [0, 3] and scorer.stats() == {"blocks": 2}  # each block scored once
