"""The Ray glue on a real local cluster: a TrainerGroup forms a gloo group, runs ZeRO-3 like 1 rank × 2b,
reports a killed worker by rank instead of hanging, and leaves nothing behind.

One cluster for the module (ray.init costs ~4.5 s and ~0.8 GB): 4 CPUs, headroom over 2 workers.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from transformers import LlamaForCausalLM

from configs import TrainConfig
from configs.errors import UserError
from engine.training.backends import TorchBackend
from engine.training.schedule import lr_at
from engine.training.runners.cluster import connect
from engine.training.runners.groups import TrainerGroup
from test_train import patterned_blocks, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
RUN_TIMEOUT = 90.0
STEPS, STEP_BLOCKS = 3, 8
# Partition every parameter: by default ones under 1e5 elements stay whole on each rank, i.e. all of a tiny model.
SHARD_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def cluster():
    """A loopback cluster whose workers can import the test helpers (they inherit PYTHONPATH from it)."""
    tests_dir = str(Path(__file__).parent)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
        with connect(None, num_cpus=4):
            yield


def _all_reduce_rank_plus_one() -> tuple[float, dict[str, str]]:
    import torch.distributed as dist
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "DS_ACCELERATOR", "OMP_NUM_THREADS")}
    dist.destroy_process_group()
    return float(t), env


def _cfg(micro: int) -> TrainConfig:
    return TrainConfig(lr=3e-3, epochs=100, micro_batch_size=micro, grad_accum=1, max_steps=STEPS, warmup_steps=2, val_fraction=0.0, seed=0)


def _step_blocks() -> list[torch.Tensor]:
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    return [patterned_blocks()[order[k * STEP_BLOCKS : (k + 1) * STEP_BLOCKS]] for k in range(STEPS)]


def _zero3_half_of_each_step(init: Path) -> list[float]:
    """Real DeepSpeedBackend, ZeRO-3 over the Ray workers' gloo group: each rank trains its half of each step."""
    import torch.distributed as dist

    from engine.training.zero import DeepSpeedBackend, ds_config_for, ensure_distributed, load_zero3_model

    torch.set_num_threads(1)
    ensure_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = STEP_BLOCKS // world
    cfg = _cfg(micro)
    ds_config = ds_config_for(cfg, world, user=SHARD_ALL)
    backend = DeepSpeedBackend(load_zero3_model(init, ds_config), cfg, ds_config)
    losses = []
    for step, blocks in enumerate(_step_blocks()):
        mine = blocks[rank * micro : (rank + 1) * micro]
        losses.append(backend.train_step([(mine, mine)], lr_at(step, STEPS, cfg)).loss)
    return losses


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_an_unreachable_address_is_a_one_line_user_error():
    """First in the module: while the module's cluster is up, connect() reuses it."""
    with pytest.raises(UserError, match=r"cannot reach the Ray cluster at 127.0.0.1:1 within"):
        with connect("127.0.0.1:1"):
            pass


def test_workers_form_a_gloo_group_from_the_env_the_group_set(cluster):
    with TrainerGroup(2) as group:
        results = group.run(_all_reduce_rank_plus_one, timeout=RUN_TIMEOUT)
    assert [total for total, _ in results] == [3.0, 3.0]
    envs = [env for _, env in results]
    assert [e["RANK"] for e in envs] == [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert all(e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == "2" for e in envs)
    assert all(e["MASTER_ADDR"] == "127.0.0.1" and e["DS_ACCELERATOR"] == "cpu" and e["OMP_NUM_THREADS"] == "1" for e in envs)


def test_zero3_on_two_ray_workers_trains_like_one_rank_with_twice_the_batch(cluster, tmp_path):
    tiny_model().save_pretrained(tmp_path / "init")
    with TrainerGroup(2) as group:
        losses = group.run(_zero3_half_of_each_step, tmp_path / "init", timeout=RUN_TIMEOUT)
    assert losses[0] == losses[1]  # the step loss is all-reduced: every rank reports the global one
    cfg = _cfg(STEP_BLOCKS)
    backend = TorchBackend(LlamaForCausalLM.from_pretrained(tmp_path / "init"), cfg, save_fn=lambda m, p: None)
    reference = [backend.train_step([(b, b)], lr_at(step, STEPS, cfg)).loss for step, b in enumerate(_step_blocks())]
    assert losses[0] == pytest.approx(reference, abs=1e-5)


def test_a_killed_worker_is_reported_by_rank_without_hanging(cluster):
    with TrainerGroup(2) as group:
        victim = group.pids()[1]
        threading.Timer(2.0, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"trainer rank 1 \(pid {victim}\) died"):
            group.run(_sleep, 60, timeout=30)
        assert time.monotonic() - start < 30


def test_the_deadline_names_the_ranks_still_running(cluster):
    with TrainerGroup(2) as group:
        with pytest.raises(TimeoutError, match=r"trainer rank 0 \(pid \d+\), trainer rank 1 \(pid \d+\) did not run _sleep within 1 s"):
            group.run(_sleep, 60, timeout=1)


def test_shutdown_leaves_no_actor_or_placement_group(cluster):
    group = TrainerGroup(2)
    pids = group.pids()
    group.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (_alive(pids) or ray.available_resources().get("CPU", 0) < 4):
        time.sleep(0.2)
    assert not _alive(pids)
    assert ray.available_resources().get("CPU", 0) == 4
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    # The public state API (ray.util.state) needs the dashboard, which is off: ask the GCS directly.
    states = [a["State"] for a in ray._private.state.actors().values()]
    assert len(states) >= 2 and set(states) == {"DEAD"}


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def _raise(error: BaseException) -> None:
    raise error


def test_a_stalled_queue_is_restartable_and_other_worker_errors_are_one_fatal_line(cluster):
    """Failures other than a process death are sorted where the driver meets them: a stalled queue restarts
    the phase like a lost worker; out of memory, a non-finite loss or a bug end the run naming the rank."""
    from configs.errors import RunFailed
    from engine.training.runners.groups import QueueStalled, WorkerLost

    with TrainerGroup(1) as group:
        with pytest.raises(WorkerLost, match=r"^trainer rank 0 \(pid \d+\): no targets from teacher 0 within 1 s"):
            group.run(_raise, QueueStalled("no targets from teacher 0 within 1 s"), timeout=30)
    for error, message in [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"), r"failed during run _raise: OutOfMemoryError: CUDA out of memory\. Tried to allocate 2\.00 GiB$"),
        (RunFailed("unlearn: the loss became nan at step 3"), r"failed during run _raise: unlearn: the loss became nan at step 3$"),
        (KeyError("x"), r"failed during run _raise: KeyError: 'x'$"),
    ]:
        with TrainerGroup(1) as group:
            with pytest.raises(RunFailed, match=r"^trainer rank 0 \(pid \d+\) " + message) as caught:
                group.run(_raise, error, timeout=30)
            assert not isinstance(caught.value, WorkerLost) and "\n" not in str(caught.value)
