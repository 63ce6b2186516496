"""`obliviate submit` on a real SLURM: slurmctld and two slurmd nodes on this machine (tests/local_slurm.py).

- The unlearn phase runs through a Ray cluster spanning both nodes (3 ZeRO-3 ranks + 1 labeler over
  2 × 2 CPUs); the job is requeued after its first checkpoint, resumes from it, `submit --wait` exits 0,
  and the run holds the consolidated model;
- `scancel` mid-run leaves no Ray or Python process and no temp dir behind.

Skipped, with the reason in pytest's summary, only where there is no root or no apt-get to install SLURM.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.data.world import write_world
from local_slurm import LocalSlurm, SlurmUnavailable
from test_cli import make_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OBLIVIATE = Path(sys.executable).parent / "obliviate"
HEAD_IP, WORKER_IPS = "127.0.0.2", {"n1": "127.0.0.11", "n2": "127.0.0.12"}
# Two SLURM nodes on one host: Ray on other loopback addresses than 127.0.0.1 (which Ray maps to the
# outward address), each node with its own ports; a small object store (the machine has little /dev/shm).
JOB_ENV = {
    "OBLIVIATE_HEAD_IP": HEAD_IP,
    "OBLIVIATE_NODE_IP_CMD": "case $SLURMD_NODENAME in " + " ".join(f"{n}) echo {ip};;" for n, ip in WORKER_IPS.items()) + " esac",
    "OBLIVIATE_NODE_PORT_STRIDE": "100",
    "OBLIVIATE_RAY_WAIT_S": "120",
    "OBLIVIATE_OBJECT_STORE_BYTES": str(256 << 20),
    "RAY_AUTH_MODE": "disabled",
}
ENGINE = ["engine.workers=3", "engine.labelers=1", "engine.checkpoint_every=2", "labels.context_length=32",
          "unlearn.micro_batch_size=2", "unlearn.grad_accum=1"]
SUBMIT = ["submit", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "2"]
RAY_OR_PYTHON = re.compile(r"ray|python|obliviate|raylet|gcs_server|plasma")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        reason = LocalSlurm.unavailable()
    except SlurmUnavailable as exc:
        pytest.fail(str(exc))
    if reason:
        pytest.skip(f"no real SLURM here: {reason}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-world")
    files = write_world(root / "world", size=0.05)
    baseline = make_model_dir(root / "a", [files.general, files.saga], 500)
    return ["--baseline", baseline, "--reinforced", baseline, "--target", files.saga, "--anchors", files.anchors]


@pytest.fixture
def job_env(cluster):
    """The submitting environment (sbatch hands it to the job) with a short per-test TMPDIR for Ray."""
    tmp = tempfile.mkdtemp(prefix="obl", dir="/tmp")
    env = {**cluster.env, **JOB_ENV, "TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    yield env
    subprocess.run(["rm", "-rf", tmp])


def unlearn_args(world, run: Path, steps: int) -> list[str]:
    return ["unlearn", *map(str, world), "--out", str(run), f"unlearn.max_steps={steps}", *ENGINE]


def job_logs(run: Path, tail: int | None = 4000) -> str:
    """The job's stdout and stderr files (their last `tail` characters each: for failure messages)."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail if tail else 0:]}" for p in sorted((run / "slurm-logs").glob("*")))


def wait_for(condition, timeout: float, what: str, run: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:g} s\n{job_logs(run)}")
        time.sleep(0.5)


def ray_or_python_processes() -> dict[int, str]:
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmdline and RAY_OR_PYTHON.search(cmdline):
                found[int(proc.name)] = cmdline
    return found


def test_submit_runs_unlearn_over_two_nodes_and_a_requeued_job_resumes_from_its_checkpoint(cluster, world, job_env, tmp_path):
    run = tmp_path / "run"
    submit = subprocess.Popen([str(OBLIVIATE), *SUBMIT, "--wait", *unlearn_args(world, run, steps=12)],
                              env=job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / "unlearn" / "latest"
    wait_for(lambda: latest.exists() or submit.poll() is not None, 300, "a first checkpoint", run)
    assert submit.poll() is None, f"the job ended before its first checkpoint\n{job_logs(run)}"
    job = (run / "slurm" / "jobs").read_text().split()[-1]

    cluster.run("scontrol", "requeue", job)  # like a preemption: every step is killed, the job queued again
    requeued_at = time.monotonic()
    while True:
        state, waited = cluster.job_state(job), time.monotonic() - requeued_at
        if state == "RUNNING" and waited >= 2:  # running again, not still the first attempt
            break
        if state == "PENDING":  # SLURM holds a requeued job for 2 min; start it now
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        if waited > 120:
            pytest.fail(f"the requeued job did not start again within 120 s\n{job_logs(run)}")
        time.sleep(1)
    out, err = submit.communicate(timeout=600)

    logs = job_logs(run, tail=None)
    assert submit.returncode == 0, f"{out}\n{err}\n{job_logs(run)}"
    assert f"submitted job {job}, waiting for it to end" in out and "ended with exit code 0" in err
    assert (run / "unlearned" / "model.safetensors").is_file()
    assert not (run / "checkpoints" / "unlearn").exists()  # removed once the model was published
    assert logs.count("Ray cluster ready: 2 node(s)") == 2, job_logs(run)  # the first attempt and the restart
    assert "--resume" in logs
    run_log = (run / "run.log").read_text()
    resumed = re.search(r"resuming at step (\d+)", run_log)
    assert resumed and int(resumed.group(1)) >= 2, run_log
    placements = re.findall(r"unlearn: trainer ranks on Ray nodes \[(.*?)\]", run_log)
    assert len(placements) == 2 and all({HEAD_IP, WORKER_IPS["n2"]} <= set(re.findall(r"[\d.]+", p)) for p in placements), run_log
    assert not list(Path(job_env["TMPDIR"]).glob("obliviate-*")), "the job left its temp dir behind"


def test_scancel_mid_run_leaves_no_ray_or_python_process_behind(cluster, world, job_env, tmp_path):
    run = tmp_path / "run"
    before = ray_or_python_processes()
    proc = subprocess.run([str(OBLIVIATE), *SUBMIT, *unlearn_args(world, run, steps=200)],
                          env=job_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    wait_for(lambda: (run / "checkpoints" / "unlearn" / "latest").exists(), 300, "a first checkpoint", run)
    started = {pid: cmd for pid, cmd in ray_or_python_processes().items() if pid not in before}
    assert any("raylet" in cmd for cmd in started.values()) and any("obliviate" in cmd for cmd in started.values()), started

    cluster.run("scancel", job)
    left: dict[int, str] = {}

    def all_gone() -> bool:
        left.clear()
        left.update({pid: cmd for pid, cmd in ray_or_python_processes().items() if pid not in before})
        return not cluster.jobs() and not left

    deadline = time.monotonic() + 90
    while not all_gone() and time.monotonic() < deadline:
        time.sleep(1)
    assert not cluster.jobs(), f"job {job} still known to SLURM 90 s after scancel"
    assert not left, "left behind after scancel:\n" + "\n".join(f"{pid} {cmd[:160]}" for pid, cmd in left.items())
    assert not list(Path(job_env["TMPDIR"]).glob("obliviate-*")), "the job left its temp dir behind"
    assert not (run / "unlearned").exists()
