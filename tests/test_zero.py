"""The DeepSpeed ZeRO-3 backend trains exactly like TorchBackend, saves a loadable model, resumes, and scales over ranks.

Real DeepSpeed (CPU accelerator, gloo) in subprocesses, so the distributed state never leaks into the test
process. One single-rank subprocess (a module fixture) does the golden run, the save, an interrupted and
resumed run and the 1 rank × 2b reference; the two-rank test launches two processes on one MASTER_PORT. The first run on a machine
JIT-compiles DeepSpeed's shared-memory comm op (≈ 1 min); later runs reuse it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from configs import TrainConfig
from engine.training.backends import TorchBackend
from engine.training.loop import fit
from test_train import GOLDEN_LOSSES, Scalars, StopAfter, patterned_blocks, tiny_model

EQUIV_STEPS = 3
# Partition every parameter: by default ones under 1e5 elements stay whole on each rank, i.e. all of a
# tiny model. Also exercises the escape hatch (a user dict merged over the generated config).
SHARD_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
GOLDEN_CFG = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=4, grad_accum=2, max_steps=5, warmup_steps=2, val_fraction=0.0, seed=0)  # tiny_run's
# Clipping below the grad norms (~0.7-1.0), weight decay, and validation through eval_loss.
CLIPPED_CFG = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=4, grad_accum=2, max_steps=5, warmup_steps=2, seed=0, grad_clip=0.3, weight_decay=0.1, val_fraction=0.2, eval_every=2)


def _torch_fit(cfg: TrainConfig) -> tuple[list[float], list[tuple[int, float]], list[float]]:
    torch.set_num_threads(1)
    ids, scalars = patterned_blocks(), Scalars()
    run = fit(TorchBackend(tiny_model(), cfg, save_fn=lambda m, p: None), ids, ids, cfg, keep_best=True, writer=scalars)
    return run.losses, run.val_losses, scalars.values["grad_norm"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, workdir: Path, world_size: int) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(workdir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=540)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zero_one")
    _launch("one", workdir, 1)
    return workdir, json.loads((workdir / "result.json").read_text())


@pytest.mark.slow
def test_golden_losses_under_zero3(one_rank):
    """Same first five losses as TorchBackend. GOLDEN_LOSSES are rounded to 5 decimals, hence rel 1e-4;
    against a live TorchBackend run they agree to 1e-6 (ZeRO-3 updates flat fp32 partitions and takes
    the grad norm in fp64, so the last bits of a step may differ)."""
    _, result = one_rank
    assert result["golden"] == pytest.approx(GOLDEN_LOSSES, rel=1e-4)  # Losses alone would not catch a
    # wrongly scaled gradient (Adam's update is nearly invariant to its scale), hence the grad norms.
    losses, _, grad_norms = _torch_fit(GOLDEN_CFG)
    assert result["golden"] == pytest.approx(losses, rel=1e-6)
    assert result["golden_grad_norms"] == pytest.approx(grad_norms, rel=1e-5)


@pytest.mark.slow
def test_clipping_weight_decay_and_validation_match_torch(one_rank):
    _, result = one_rank
    losses, val_losses, grad_norms = _torch_fit(CLIPPED_CFG)
    assert result["clipped"] == pytest.approx(losses, rel=1e-6)
    assert result["clipped_grad_norms"] == pytest.approx(grad_norms, rel=1e-5)
    assert [s for s, _ in result["clipped_val"]] == [s for s, _ in val_losses] == [0, 2, 4, 5]
    assert [v for _, v in result["clipped_val"]] == pytest.approx([v for _, v in val_losses], rel=1e-6)


@pytest.mark.slow
def test_saved_model_gives_the_live_logits(one_rank):
    workdir, result = one_rank
    assert (workdir / "saved" / "model.safetensors").is_file()
    assert not (workdir / ".saved.tmp").exists()
    assert result["saved_logits_max_diff"] <= 1e-5


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(one_rank):
    workdir, result = one_rank
    assert result["interrupted_steps"] == 3
    assert result["resumed"] == result["golden"]
    assert result["resumed_trained_steps"] == [4, 5]
    whole, resumed = load_file(workdir / "saved" / "model.safetensors"), load_file(workdir / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    assert (workdir / "ckpt" / "latest").read_text() == "step-4"
    assert sorted(d.name for d in (workdir / "ckpt").iterdir()) == ["latest", "step-3", "step-4"]


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_with_twice_the_batch(one_rank, tmp_path):
    """Through fit(): the same blocks per step, an epoch boundary inside step 3, 5 validation blocks padded
    to 3 per rank; the checkpoint holds one ZeRO-3 shard file per rank."""
    _, result = one_rank
    _launch("two", tmp_path, 2)
    two = json.loads((tmp_path / "result.json").read_text())
    assert two["losses"] == pytest.approx(result["one_rank_2b"]["losses"], abs=1e-5)
    assert [s for s, _ in two["val"]] == [s for s, _ in result["one_rank_2b"]["val"]] == [0, 2, 3]
    assert [v for _, v in two["val"]] == pytest.approx([v for _, v in result["one_rank_2b"]["val"]], abs=1e-5)
    assert two["grad_norms"] == pytest.approx(result["one_rank_2b"]["grad_norms"], rel=1e-4)
    shards = sorted(p.name for p in (tmp_path / "equiv_ckpt" / f"step-{EQUIV_STEPS}" / "zero").glob("*optim_states.pt"))
    assert len(shards) == 2 and shards[0].startswith("zero_pp_rank_0") and shards[1].startswith("zero_pp_rank_1")


def _equivalence_run(workdir: Path, micro: int) -> dict:
    """fit() with `micro` blocks per rank and step (no accumulation), checkpointed at the end."""
    from engine.training.zero import DeepSpeedBackend, ds_config_for, load_zero3_model

    cfg = TrainConfig(lr=3e-3, epochs=100, micro_batch_size=micro, grad_accum=1, max_steps=EQUIV_STEPS, warmup_steps=2, val_fraction=0.2, eval_every=2, seed=0)
    ds_config = ds_config_for(cfg, dist.get_world_size(), user=SHARD_ALL)
    backend = DeepSpeedBackend(load_zero3_model(workdir / "init", ds_config), cfg, ds_config)
    ids, scalars = patterned_blocks(), Scalars()
    run = fit(backend, ids, ids, cfg, keep_best=True, writer=scalars, checkpoint_dir=workdir / "equiv_ckpt", checkpoint_every=EQUIV_STEPS)
    return {"losses": run.losses, "val": run.val_losses, "grad_norms": scalars.values.get("grad_norm")}


def _main(mode: str, workdir: Path) -> None:
    from engine.training.zero import DeepSpeedBackend, ds_config_for, ensure_distributed, load_zero3_model  # DeepSpeed only in the subprocesses

    torch.set_num_threads(1)
    ensure_distributed()
    if dist.get_rank() == 0:
        tiny_model().save_pretrained(workdir / "init")
    dist.barrier()
    if mode == "one":
        ds_config = golden_ds = ds_config_for(GOLDEN_CFG, 1, user=SHARD_ALL)
        assert ds_config["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 0}
        backend = DeepSpeedBackend(load_zero3_model(workdir / "init", ds_config), GOLDEN_CFG, ds_config)
        head = backend.engine.module.lm_head.weight
        assert head.numel() == 0 and hasattr(head, "ds_id"), "the head must really be a ZeRO-3 shard"
        ids = patterned_blocks()
        scalars = Scalars()
        result = {"golden": fit(backend, ids, ids, GOLDEN_CFG, save_to=workdir / "saved", keep_best=False, writer=scalars).losses}
        result["golden_grad_norms"] = scalars.values["grad_norm"]
        probe = ids[:3]
        with torch.no_grad():
            backend.engine.eval()
            live = backend.engine(input_ids=probe).logits
            saved = LlamaForCausalLM.from_pretrained(workdir / "saved").eval()(input_ids=probe).logits
        result["saved_logits_max_diff"] = float((live - saved).abs().max())
        ds_config, scalars = ds_config_for(CLIPPED_CFG, 1, user=SHARD_ALL), Scalars()
        clipped = fit(DeepSpeedBackend(load_zero3_model(workdir / "init", ds_config), CLIPPED_CFG, ds_config), ids, ids, CLIPPED_CFG, keep_best=True, writer=scalars)
        result["clipped"], result["clipped_val"], result["clipped_grad_norms"] = clipped.losses, clipped.val_losses, scalars.values["grad_norm"]
        checkpointed = {"checkpoint_dir": workdir / "ckpt", "checkpoint_every": 2}
        interrupted = fit(DeepSpeedBackend(load_zero3_model(workdir / "init", golden_ds), GOLDEN_CFG, golden_ds), ids, ids, GOLDEN_CFG, keep_best=False, stop=StopAfter(3), **checkpointed)
        result["interrupted_steps"] = interrupted.steps
        scalars = Scalars()
        resumed = fit(DeepSpeedBackend(load_zero3_model(workdir / "init", golden_ds), GOLDEN_CFG, golden_ds), ids, ids, GOLDEN_CFG, save_to=workdir / "resumed", keep_best=False, writer=scalars, resume=True, **checkpointed)
        result["resumed"], result["resumed_trained_steps"] = resumed.losses, scalars.steps["loss"]
        result["one_rank_2b"] = _equivalence_run(workdir, 2 * 4)
    else:
        result = _equivalence_run(workdir, 4)
    if dist.get_rank() == 0:
        (workdir / "result.json").write_text(json.dumps(result))
        print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1], Path(sys.argv[2]))
