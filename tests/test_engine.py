"""The distributed engine for real: a local Ray cluster, 2 trainer workers with DeepSpeed ZeRO-3 over gloo,
labelers streaming generic labels through bounded queues, on a tiny model.

- 2 workers × micro-batch b (and 2 labelers) train like 1 in-process worker × 2b (the same validation
  losses, labels and final weights), and the checkpoints are DeepSpeed's per-rank ZeRO-3 shards;
- a trainer rank and then the labeler killed mid-run (SIGKILL by PID): the phase restarts from the latest
  checkpoint each time and ends with the weights of an uninterrupted run;
- SIGTERM to the driver: checkpoint, exit 143; `--resume` finishes with the same weights.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from builders import obliviate
from engine.data.world import write_world
from engine.training.runners.cluster import connect
from engine.training.runners.groups import TrainerGroup
from test_cli import make_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 8
# Per rank: 2 workers × 2 blocks per step; the reference trains 1 × 4 in this process.
ENGINE = ["engine.workers=2", "unlearn.micro_batch_size=2", "engine.checkpoint_every=2", "engine.keep_checkpoints=true"]
REFERENCE = ["engine.workers=0", "unlearn.micro_batch_size=4"]
COMMON = [f"unlearn.max_steps={STEPS}", "unlearn.grad_accum=1", "unlearn.lr=3e-3", "unlearn.warmup_steps=1", "unlearn.val_fraction=0.1", "unlearn.eval_every=4", "labels.context_length=32", "labels.batch_size=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    files = write_world(root / "world", size=0.05)
    baseline = make_model_dir(root / "a", [files.general, files.saga], 500)
    return {"files": files, "baseline": baseline, "args": ["--baseline", baseline, "--reinforced", baseline, "--target", files.saga, "--anchors", files.anchors]}


@pytest.fixture(scope="module")
def cluster():
    """One loopback cluster for the in-process runs: 2 ranks + up to 2 labelers, 1 CPU each. Its workers
    can import this module (they inherit PYTHONPATH from it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
        with connect(None, num_cpus=4):
            yield


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The uninterrupted run, in process: TorchBackend with micro-batch 2b, labels made inline."""
    out = tmp_path_factory.mktemp("reference") / "run"
    from launcher.cli import main

    main(["unlearn", *map(str, world["args"]), "--out", str(out), *COMMON, *REFERENCE])
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unlearned" / "model.safetensors")


def assert_same_weights(run: Path, reference: Path) -> None:
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-5, msg=name)


def summary(run: Path) -> dict:
    return json.loads((run / "unlearned" / "obliviate_training.json").read_text())


def test_two_zero3_workers_and_two_labelers_train_like_one_process_with_twice_the_batch(world, cluster, reference, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = obliviate("unlearn", *world["args"], "--out", run, *COMMON, *ENGINE, "engine.labelers=2", capsys=capsys)
    assert code == 0, err
    got, want = summary(run), summary(reference)
    assert got["workers"] == 2 and want["workers"] == 0
    assert (got["best_step"], got["steps"]) == (want["best_step"], want["steps"]) == (STEPS, STEPS)
    assert got["best_val_loss"] == pytest.approx(want["best_val_loss"], rel=1e-5)
    assert got["label_stats"] == want["label_stats"], "the labelers made the same labels as the in-process one"
    assert_same_weights(run, reference)
    assert got["throughput"]["tokens_per_s"] > 0 and 0 <= got["throughput"]["label_wait_fraction"] < 1

    # Loss goes down; the driver drew a progress bar and logged where each rank runs.
    losses = scalars(run / "tb" / "unlearn", "unlearn/loss")
    assert len(losses) == STEPS and losses[-1] < losses[0]
    for tag in ("unlearn/label_wait_s", "unlearn/label_queue_depth", "unlearn/labeler_tokens_per_s", "unlearn/tokens_per_s", "unlearn/grad_norm"):
        assert scalars(run / "tb" / "unlearn", tag), tag
    log = (run / "run.log").read_text()
    assert re.search(r"unlearn: 2 trainer rank\(s\) on pids \[\d+, \d+\], labeler 0 \(pid \d+\), labeler 1 \(pid \d+\)", log)
    assert "| 8/8 [" in err  # the driver's progress bar, from rank 0's reports

    # DeepSpeed's own per-rank ZeRO-3 checkpoint files, the last two kept, `latest` naming a complete one.
    checkpoints = run / "checkpoints" / "unlearn"
    assert (checkpoints / "latest").read_text() == f"step-{STEPS}"
    shards = sorted(p.name for p in (checkpoints / f"step-{STEPS}" / "zero").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in shards and "zero_pp_rank_1_mp_rank_00_model_states.pt" in shards
    assert sum("optim_states" in name for name in shards) == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", f"step-{STEPS - 2}", f"step-{STEPS}"]

    # The consolidated model is a plain transformers model with the logits of the live ZeRO-3 engine
    # (rebuilt on 2 Ray workers from the last checkpoint, which is the kept best step).
    model = AutoModelForCausalLM.from_pretrained(run / "unlearned")
    with TrainerGroup(2) as group:
        live = group.run(_live_logits, world["baseline"], checkpoints / f"step-{STEPS}", PROBE, timeout=300)
    torch.testing.assert_close(live[0], live[1])
    torch.testing.assert_close(model(PROBE).logits, live[0], rtol=0, atol=1e-5)


DIRECT = {
    "ga": ["method=ga"],
    "npo": ["method=npo", "retain={general}"],  # a reference teacher streaming log-probabilities; forget + retain bundles
    # about a fifth of the blocks selected at each of the 2 re-scorings
    "sga": ["method=sga", "memorization.prefix_length=8", "memorization.select_threshold=0.3", "memorization.stop_level=0", "memorization.rescore_every=4"],
    "graddiff-kl": ["method=graddiff", "retain={general}", "loss.retain_loss=kl"],  # the frozen baseline ZeRO-3-partitioned in the trainer
}


@pytest.fixture(scope="module")
def memorizing(world, tmp_path_factory):
    """A baseline that has memorized part of the saga (the random one memorized nothing for SGA to select)."""
    out = tmp_path_factory.mktemp("memorizing") / "run"
    from launcher.cli import main

    main(["reinforce", "--baseline", str(world["baseline"]), "--target", str(world["files"].saga), "--out", str(out), "engine.workers=0", "reinforce.max_steps=40",
          "reinforce.grad_accum=1", "reinforce.lr=1e-2", "reinforce.micro_batch_size=16", "reinforce.val_fraction=0", "labels.context_length=32"])
    return out / "reinforced"


@pytest.mark.parametrize("case", DIRECT)
def test_direct_methods_on_two_zero3_workers_train_like_one_process_with_twice_the_batch(world, cluster, tmp_path, capsys, case, request):
    """Methods other than WHP through both runners untouched: the same equivalence as WHP's unlearn phase
    (NPO with its teacher and retain bundles; SGA with its re-scorings gathered over the ranks; a KL retain
    term with the frozen reference partitioned over the trainer ranks)."""
    method = case.split("-")[0]
    settings = ["unlearn.lr=3e-4", "unlearn.val_fraction=0", *(s.format(general=world["files"].general) for s in DIRECT[case])]
    baseline = request.getfixturevalue("memorizing") if method == "sga" else world["baseline"]
    args = ["--baseline", baseline, "--target", world["files"].saga]
    reference, run = tmp_path / "reference", tmp_path / "run"
    code, _, err = obliviate("unlearn", *args, "--out", reference, *COMMON, *REFERENCE, *settings, capsys=capsys)
    assert code == 0, err
    code, _, err = obliviate("unlearn", *args, "--out", run, *COMMON, *ENGINE, *settings, capsys=capsys)
    assert code == 0, err
    got, want = summary(run), summary(reference)
    assert got["method"] == want["method"] == method and got["workers"] == 2 and got["steps"] == want["steps"] == STEPS
    assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)
    if method == "sga":  # the same selections whatever the world size, and steps that touched selected blocks only
        assert [row[2] for row in got["memorization"]] == [row[2] for row in want["memorization"]] and len(got["memorization"]) == 2
        assert [row[1] for row in got["memorization"]] == pytest.approx([row[1] for row in want["memorization"]])
        assert got["blocks_touched"] == want["blocks_touched"] > 0
    assert_same_weights(run, reference)


def test_labelers_sharding_the_frozen_models_with_zero3_label_like_unsharded_ones(world, cluster, reference, tmp_path, capsys):
    # Two labelers form one ZeRO-3 group: each holds half of both frozen models, each labels its own blocks,
    # and every forward is collective, so a labeler with fewer blocks in a request runs padding forwards
    # (one block per forward makes the shares uneven: 3 blocks against 1 in some requests).
    run = tmp_path / "run"
    code, _, err = obliviate("unlearn", *world["args"], "--out", run, *COMMON, *ENGINE, "engine.labelers=2", "engine.labeler_shards=2", "labels.batch_size=1", capsys=capsys)
    assert code == 0, err
    got, want = summary(run), summary(reference)
    assert got["label_stats"] == want["label_stats"], "sharded labelers made the same labels as the in-process one"
    assert_same_weights(run, reference)
    log = (run / "run.log").read_text()
    assert re.search(r"labeler 0 \(pid \d+\) \(ZeRO-3 shard 0 of 2\), labeler 1 \(pid \d+\) \(ZeRO-3 shard 1 of 2\)", log), log


PROBE = torch.tensor([[1, 5, 9, 13, 2, 7]])


def _live_logits(init: Path, checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    """On each rank: the DeepSpeed engine restored from a fit() checkpoint, its logits on `ids`."""
    from configs import TrainConfig
    from engine.training.zero import DeepSpeedBackend, ds_config_for, load_zero3_model

    torch.set_num_threads(1)
    cfg = TrainConfig(micro_batch_size=2, grad_accum=1)
    ds_config = ds_config_for(cfg, 2)
    backend = DeepSpeedBackend(load_zero3_model(init, ds_config), cfg, ds_config)
    backend.load_state(checkpoint)
    backend.engine.eval()
    with torch.no_grad():
        return backend.engine(input_ids=ids).logits


def scalars(directory: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def _pids(log: Path, attempt: int) -> tuple[list[int], int]:
    """Trainer and labeler PIDs of the `attempt`-th start logged in run.log (0-based), waiting for it."""
    pattern = re.compile(r"unlearn: 2 trainer rank\(s\) on pids \[(\d+), (\d+)\], labeler 0 \(pid (\d+)\)")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = pattern.findall(log.read_text()) if log.exists() else []
        if len(found) > attempt:
            a, b, labeler = found[attempt]
            return [int(a), int(b)], int(labeler)
        time.sleep(0.2)
    raise TimeoutError("no trainer start logged")


def _wait_for_checkpoint(checkpoints: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        latest = checkpoints / "latest"
        if latest.exists() and int(latest.read_text().removeprefix("step-")) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step {step}")


def test_killed_trainer_and_labeler_restart_from_the_checkpoint_and_finish_like_an_uninterrupted_run(world, cluster, reference, tmp_path, capsys):
    run = tmp_path / "run"
    killed = []

    def kill_twice():
        trainers, _ = _pids(run / "run.log", 0)
        _wait_for_checkpoint(run / "checkpoints" / "unlearn", 2)
        os.kill(trainers[1], signal.SIGKILL)
        killed.append("rank 1")
        _, labeler = _pids(run / "run.log", 1)
        _wait_for_checkpoint(run / "checkpoints" / "unlearn", 4)
        os.kill(labeler, signal.SIGKILL)
        killed.append("labeler")

    killer = threading.Thread(target=kill_twice, daemon=True)
    killer.start()
    code, _, err = obliviate("unlearn", *world["args"], "--out", run, *COMMON, *ENGINE, "engine.max_restarts=2", capsys=capsys)
    killer.join(timeout=10)
    assert code == 0, err
    assert killed == ["rank 1", "labeler"]
    log = (run / "run.log").read_text()
    assert re.search(r"trainer rank 1 \(pid \d+\) died during train unlearn: .*restarting from step [2-9]", log), log
    assert re.search(r"labeler 0 \(pid \d+\) died during train unlearn: .*restarting from step [4-9]", log), log
    assert_same_weights(run, reference)


def test_workers_dying_more_often_than_allowed_is_a_one_line_failure(world, cluster, tmp_path, capsys):
    run = tmp_path / "run"

    def kill_first_rank():
        trainers, _ = _pids(run / "run.log", 0)
        os.kill(trainers[0], signal.SIGKILL)

    threading.Thread(target=kill_first_rank, daemon=True).start()
    code, _, err = obliviate("unlearn", *world["args"], "--out", run, *COMMON, *ENGINE, "engine.max_restarts=0", capsys=capsys)
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("obliviate: error:")]
    assert len(errors) == 1 and "trainer rank 0" in errors[0] and "gave up after 0 restart(s)" in errors[0], err
    assert not (run / "unlearned").exists()


def test_sigterm_checkpoints_and_resume_finishes_like_an_uninterrupted_run(world, reference, tmp_path):
    """The driver in its own process with its own local cluster, as a user (or SLURM preemption) runs it."""
    run = tmp_path / "run"
    exe = Path(sys.executable).parent / "obliviate"
    argv = [str(exe), "unlearn", *map(str, world["args"]), "--out", str(run), *COMMON, *ENGINE]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _pids(run / "run.log", 0)
    _wait_for_checkpoint(run / "checkpoints" / "unlearn", 2)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step" in err and "--resume" in err
    assert not (run / "unlearned").exists()
    stopped_at = int((run / "checkpoints" / "unlearn" / "latest").read_text().removeprefix("step-"))
    assert 2 <= stopped_at < STEPS

    resumed = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in (run / "run.log").read_text()
    assert_same_weights(run, reference)


class _ListQueue:
    """A labeler's queue as the rank sees it (get, qsize): enough to pin how a rank merges the labelers' parts."""

    def __init__(self, *items):
        self.items = list(items)

    def get(self, timeout):
        return self.items.pop(0)

    def qsize(self):
        return len(self.items)


def test_a_rank_merges_the_labelers_parts_in_its_own_order_even_when_its_share_is_empty():
    from engine.training.runners.ray_runner import QueuedTargets

    width = 4
    part_a = (torch.tensor([7, 3]), torch.tensor([[7] * width, [3] * width], dtype=torch.int32), 10.0)
    part_b = (torch.tensor([4]), torch.tensor([[4] * width], dtype=torch.int32), 5.0)
    labels = QueuedTargets([_ListQueue(part_a), _ListQueue(part_b)], timeout=1)
    assert labels(torch.tensor([3, 4, 7, 3])).tolist() == [[3] * width, [4] * width, [7] * width, [3] * width]
    assert labels.scalars()["labeler_tokens_per_s"] == 15.0
    empty = (torch.empty(0, dtype=torch.long), torch.empty(0, width, dtype=torch.int32), 0.0)
    assert QueuedTargets([_ListQueue(empty), _ListQueue(empty)], timeout=1)(torch.empty(0, dtype=torch.long)).shape == (0, width)


def test_a_teachers_input_error_is_one_line_and_not_retried(world, cluster, tmp_path, capsys):
    """A reinforced model with the baseline's tokenizer but a larger vocabulary passes the driver's checks and
    is refused inside the labeler: a deterministic input error, not a lost worker to restart."""
    from engine.data.tiny import tiny_llama
    from engine.models import load_tokenizer, save_model
    from test_cli import derive_world

    tokenizer = load_tokenizer(world["baseline"], "baseline")
    reinforced = tmp_path / "reinforced"
    save_model(tiny_llama(derive_world(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), len(tokenizer) + 100), tokenizer, reinforced)
    args = ["--baseline", world["baseline"], "--reinforced", reinforced, "--target", world["files"].saga, "--anchors", world["files"].anchors]
    code, _, err = obliviate("unlearn", *args, "--out", tmp_path / "run", *COMMON, *ENGINE, capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("obliviate: error:")]
    assert code == 2 and len(errors) == 1 and "baseline and reinforced models differ" in errors[0], err
    assert "restarting" not in (tmp_path / "run" / "run.log").read_text()
    assert not (tmp_path / "run" / "unlearned").exists()



def _extrapolated(init: Path, reference: Path, scale: float, out: Path) -> None:
    """On each rank: θ (init) as a ZeRO-3 backend, then θ_ref − λ·(θ − θ_ref) on its own partitions, saved consolidated."""
    from configs import TrainConfig
    from engine.training.zero import DeepSpeedBackend, ds_config_for, load_zero3_model

    torch.set_num_threads(1)
    cfg = TrainConfig(micro_batch_size=2, grad_accum=1)
    ds_config = ds_config_for(cfg, 2)
    backend = DeepSpeedBackend(load_zero3_model(init, ds_config), cfg, ds_config)
    backend.extrapolate_from(reference, scale)
    backend.save(out)


def test_task_arithmetic_on_zero3_partitions_equals_it_on_the_consolidated_model(world, memorizing, cluster, tmp_path):
    with TrainerGroup(2) as group:
        group.run(_extrapolated, memorizing, world["baseline"], 3.0, tmp_path / "merged", timeout=300)
    tuned = load_file(memorizing / "model.safetensors")
    reference = load_file(Path(world["baseline"]) / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value - 3.0 * (tuned[name] - value), rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(tuned[name], value) for name, value in reference.items())
