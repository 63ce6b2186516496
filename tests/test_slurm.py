"""SLURM job script and launcher/slurm.py, without SLURM: stub srun/scontrol/hostname/ip, a fake `ray` and
driver, so the script's whole flow (address, steps, polling, driver command, SIGTERM, requeue, teardown)
runs in a few seconds. A real SLURM + Ray run is not part of this file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from configs.errors import UserError
from launcher import slurm

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "obliviate.sbatch"
JOB_ID = 4242
HEAD_IP, WORKER_IP = "10.9.0.1", "10.9.0.2"


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


def bash_n(path: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def render(args=("run", "configs/llama2-7b.yaml", "--baseline", "/models/base", "--out", "runs/x"), **kw) -> str:
    """The script for `args`, whose --out is the run directory (as the CLI resolves it from the config)."""
    params = dict(nodes=2, gpus_per_node=8, partition="gpu", time="24:00:00", account="proj1", job_name="obliviate", run_dir=Path(args[list(args).index("--out") + 1] if "--out" in args else "runs/x"))
    params.update(kw)
    return slurm.render(list(args), **params)


def header(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH ")]


def bash_source(script: Path, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Source the script (defines its functions, returns before main) and run `code` after it."""
    full_env = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run(["bash", "-c", f"source {script}\n{code}"], capture_output=True, text=True, env=full_env, timeout=60)


# ---------------------------------------------------------------- render


def test_rendered_script_passes_bash_n_and_binds_no_wildcard(tmp_path):
    bash_n(SCRIPT)
    text = render()
    (tmp_path / "job.sbatch").write_text(text)
    bash_n(tmp_path / "job.sbatch")
    for source in (text, SCRIPT.read_text()):
        assert "0.0.0.0" not in source
        assert "--node-ip-address=" in source
        assert "--include-dashboard=false" in source
        assert "--dashboard-host=127.0.0.1" in source
        code = [line for line in source.splitlines() if not line.lstrip().startswith("#")]
        assert not any(re.search(r"\bray stop\b|\bstop\b.*\$OBLIVIATE_RAY", line) for line in code)


def test_header_has_the_requested_resources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = render(nodes=3, gpus_per_node=4, partition="a100", time="1-00:00:00", account="acct_7", job_name="whp", cpus_per_task=32, extra_sbatch=["--exclusive", "--constraint=ib"])
    lines = header(text)
    for expected in (
        "#SBATCH --job-name=whp",
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=a100",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --account=acct_7",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@120",
        f"#SBATCH --chdir={tmp_path.resolve()}",
        f"#SBATCH --output={tmp_path.resolve()}/runs/x/slurm-logs/%x-%j.out",
        f"#SBATCH --error={tmp_path.resolve()}/runs/x/slurm-logs/%x-%j.err",
        "#SBATCH --exclusive",
        "#SBATCH --constraint=ib",
    ):
        assert expected in lines, (expected, lines)
    assert len([line for line in lines if line.startswith("#SBATCH --nodes")]) == 1  # the template's header is replaced
    # the #SBATCH block comes before the first command, or sbatch ignores it
    first_code = next(i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#") and i > 0)
    assert all(i < first_code for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def test_header_without_gpus_or_optional_fields():
    lines = header(render(gpus_per_node=0, partition=None, time=None, account=None))
    assert not any(x in line for line in lines for x in ("--gpus-per-node", "--partition", "--time", "--account", "--cpus-per-task"))
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --requeue" in lines


def test_paths_with_spaces_and_percent_in_the_header(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = header(render(args=("run", "--out", "my runs/50%")))
    assert f'#SBATCH --output="{tmp_path.resolve()}/my runs/50%%/slurm-logs/%x-%j.out"' in lines


TRICKY = ["run", "configs/llama2-7b.yaml", "--baseline", "/models/with space/llama", "--target", "it's \"quoted\" $HOME `id` ;|&", "--out", "runs/a b", "labels.alpha=5", "--anchors", "x\ny", "*"]


def test_command_line_survives_a_bash_round_trip(tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(args=TRICKY))
    proc = bash_source(path, 'printf "%s\\0" "$@"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\0")[:-1] == TRICKY


def test_render_bakes_the_python(tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(render(python="/opt/my venv/bin/python"))
    assert bash_source(path, 'echo "$OBLIVIATE_PYTHON"').stdout.strip() == "/opt/my venv/bin/python"
    assert bash_source(path, 'echo "$OBLIVIATE_PYTHON"', {"OBLIVIATE_PYTHON": "/other/python"}).stdout.strip() == "/other/python"


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(nodes=0), "--nodes"),
        (dict(gpus_per_node=-1), "--gpus-per-node"),
        (dict(args=("eval", "--model", "m", "--out", "r")), "cannot submit 'eval'"),
        (dict(args=()), "no command"),
        (dict(args=("run", "--out", "r", "--ray-address", "h:1")), "--ray-address"),
        (dict(partition="a b"), "--partition"),
        (dict(time="1:00\n#SBATCH --x"), "--time"),
        (dict(job_name=""), "--job-name"),
        (dict(extra_sbatch=["exclusive"]), "sbatch option"),
        (dict(extra_sbatch=["--a\n--b"]), "sbatch option"),
        (dict(cpus_per_task=0), "--cpus-per-task"),
        (dict(args=("run", "--out", 'a"b')), "quote"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(kw, fragment):
    with pytest.raises(UserError) as exc:
        render(**kw)
    assert fragment in one_line(exc)


def test_command_helpers():
    assert slurm.normalize_command(["configs/x.yaml", "--out", "r"]) == ["run", "configs/x.yaml", "--out", "r"]
    assert slurm.normalize_command(["reinforce", "--out", "r"]) == ["reinforce", "--out", "r"]
    slurm.check_fits("run", 4, 4, 1, 8)
    slurm.check_fits("reinforce", 8, 4, 1, 8)
    slurm.check_fits("run", 64, 64, 1, 0)  # a CPU job: nothing to count
    with pytest.raises(UserError) as exc:
        slurm.check_fits("unlearn", 8, 4, 1, 8)
    assert "12 GPUs" in one_line(exc)


# ---------------------------------------------------------------- port arithmetic


def ports(job: int, node: int = 0, nodes: int = 1, env: dict | None = None) -> dict[str, int]:
    proc = bash_source(SCRIPT, f'obliviate_ports {job} {node} {nodes} && set | grep "^PORT_"', env)
    assert proc.returncode == 0, proc.stderr
    return {k: int(v) for k, v in (line.split("=") for line in proc.stdout.split())}


def port_set(p: dict[str, int], worker_range: bool = True) -> set[int]:
    fixed = {v for k, v in p.items() if k not in ("PORT_FIRST", "PORT_LAST", "PORT_WORKER_MIN", "PORT_WORKER_MAX")}
    return fixed | (set(range(p["PORT_WORKER_MIN"], p["PORT_WORKER_MAX"] + 1)) if worker_range else set())


def test_two_jobs_get_disjoint_port_ranges():
    a, b = ports(1000), ports(1001)
    assert set(range(a["PORT_FIRST"], a["PORT_LAST"] + 1)).isdisjoint(range(b["PORT_FIRST"], b["PORT_LAST"] + 1))
    for p in (a, b):
        assert port_set(p) <= set(range(p["PORT_FIRST"], p["PORT_LAST"] + 1))
        fixed = port_set(p, False)
        assert len(fixed) == 9 and fixed.isdisjoint(range(p["PORT_WORKER_MIN"], p["PORT_WORKER_MAX"] + 1))
        assert p["PORT_WORKER_MAX"] - p["PORT_WORKER_MIN"] + 1 >= 256
        assert 20000 <= p["PORT_FIRST"] and p["PORT_LAST"] < 32768  # above Ray's defaults, below the ephemeral range
    assert ports(1000 + 31) == a  # 31 slots by default: ids 31 apart share a block (documented)


def test_consecutive_jobs_all_disjoint():
    proc = bash_source(SCRIPT, 'for j in $(seq 5000 5030); do obliviate_ports $j; echo "$PORT_FIRST $PORT_LAST"; done')
    blocks = sorted(tuple(map(int, line.split())) for line in proc.stdout.splitlines())
    assert len(blocks) == 31
    assert all(a[1] < b[0] for a, b in zip(blocks, blocks[1:]))


def test_nodes_on_one_host_get_their_own_ports():
    env = {"OBLIVIATE_NODE_PORT_STRIDE": "150"}
    head, worker = ports(7, 0, 2, env), ports(7, 1, 2, env)
    assert head["PORT_GCS"] == worker["PORT_GCS"]
    node_ports = lambda p: port_set(p) - {p["PORT_GCS"], p["PORT_CLIENT"], p["PORT_DASHBOARD"]}  # noqa: E731
    assert node_ports(head).isdisjoint(node_ports(worker))
    assert max(node_ports(worker)) <= worker["PORT_LAST"]
    bad = bash_source(SCRIPT, "obliviate_ports 7 0 3 || echo failed", env)
    assert "failed" in bad.stdout and "STRIDE" in bad.stderr
    bad = bash_source(SCRIPT, "obliviate_ports 12x || echo failed")
    assert "failed" in bad.stdout and "not a non-negative integer" in bad.stderr


# ---------------------------------------------------------------- the poller (real python, fake ray module)


def poll(tmp_path, mode: str, wait_s: int, env: dict | None = None, pids: str = "") -> subprocess.CompletedProcess:
    code = (
        f"OBLIVIATE_PYTHON={sys.executable}; HEAD_IP=127.0.0.1; PORT_GCS=1; N=2; EXPECT_GPUS=8; WAIT_S={wait_s}; "
        f"CHILD_PID=; STEP_PIDS=({pids}); DEADLINE=$(( $(date +%s) + {wait_s} )); wait_for {mode} && echo ready || echo failed=$?"
    )
    return bash_source(SCRIPT, code, {"PYTHONPATH": str(tmp_path / "fakeray"), **(env or {})})


@pytest.fixture
def fake_ray_module(tmp_path):
    package = tmp_path / "fakeray" / "ray"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\n_calls = 0\n"
        "def init(**kw):\n    pass\n"
        "def shutdown():\n    pass\n"
        "def nodes():\n    global _calls\n    _calls += 1\n"
        "    ready = _calls > int(os.environ['FAKE_AFTER'])\n"
        "    return [{'Alive': True, 'Resources': {'GPU': 4.0}}, {'Alive': ready, 'Resources': {'GPU': 4.0}}]\n"
    )


def test_poller_times_out_on_a_closed_port_with_one_line(tmp_path):
    start = time.monotonic()
    proc = poll(tmp_path, "port", 1)
    assert "failed=1" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "did not open 127.0.0.1:1 within 1 s (OBLIVIATE_RAY_WAIT_S)" in errors[0], proc.stderr
    assert time.monotonic() - start < 20


def test_poller_waits_for_every_node_and_gpu(tmp_path, fake_ray_module):
    proc = poll(tmp_path, "cluster", 30, {"FAKE_AFTER": "1"})
    assert "ready" in proc.stdout, proc.stderr
    assert "2 node(s), 8 GPU(s)" in proc.stderr
    proc = poll(tmp_path, "cluster", 1, {"FAKE_AFTER": "1000"})
    assert "failed=1" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "only 1 of 2 Ray node(s) and 4 of 8 GPU(s) registered within 1 s" in errors[0], proc.stderr


def test_poller_fails_early_when_a_ray_step_ended(tmp_path, fake_ray_module):
    gone = subprocess.Popen(["true"])
    gone.wait()
    start = time.monotonic()
    proc = poll(tmp_path, "cluster", 60, {"FAKE_AFTER": "1000"}, pids=str(gone.pid))
    assert "failed=1" in proc.stdout and f"srun pid {gone.pid}) ended" in proc.stderr, proc.stderr
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------- the whole script, with stubs

STUBS = {
    "srun": r"""#!/bin/bash
all="$*"
echo "srun ${all//$'\n'/ }" >> "$STUB_LOG/srun.log"  # one line a call (the node code is multi-line)
node=""
while (( $# )); do case $1 in -w) node=$2; shift 2;; -*) shift;; *) break;; esac; done
export SLURMD_NODENAME=${node:-node2}
exec "$@"
""",
    "scontrol": r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf '%s\n' $STUB_NODES ;;
  "show job") echo "JobId=$3 JobName=obliviate JobState=${STUB_JOB_STATE:-RUNNING} Reason=None" ;;
  requeue*) echo "$*" >> "$STUB_LOG/requeue" ;;
  *) exit 1 ;;
esac
""",
    "hostname": r"""#!/bin/bash
case $1 in
  --ip-address) if [[ $SLURMD_NODENAME == node1 ]]; then echo "${STUB_HEAD_IP:-10.9.0.1} fe80::1"; else echo "10.9.0.2"; fi ;;
  *) echo "${SLURMD_NODENAME:-stubhost}" ;;
esac
""",
    "ip": r"""#!/bin/bash
[[ $SLURMD_NODENAME == node1 ]] && src=10.9.0.1 || src=10.9.0.2
echo "$4 dev eth0 src $src uid 0"
""",
    "python": r"""#!/bin/bash
echo "$*" >> "$STUB_LOG/poll.log"
# as the real poller sees it: the head's port opens once its ray runs; `cluster` with 2+ nodes is complete
# once the worker's ray runs
wait_for=$STUB_LOG/ray-head.args
[[ $2 == cluster && $5 -gt 1 ]] && wait_for=$STUB_LOG/ray-worker.args
for _ in $(seq 100); do [[ -e $wait_for ]] && break; sleep 0.1; done
if [[ ${STUB_POLL_RC:-0} != 0 ]]; then echo "obliviate.sbatch: error: stub poll failed" >&2; fi
exit "${STUB_POLL_RC:-0}"
""",
    "ray": r"""#!/bin/bash
role=worker
for a; do [[ $a == --head ]] && role=head; done
trap 'echo stopped > "$STUB_LOG/ray-$role.stopped"; exit 0' TERM
echo "$1" >> "$STUB_LOG/ray-calls"
printf '%s\n' "$@" > "$STUB_LOG/ray-$role.args"
while :; do sleep 0.1; done
""",
    "obliviate": r"""#!/bin/bash
printf '%s\0' "$@" > "$STUB_LOG/driver.argv"
case ${STUB_DRIVER:-ok} in
  ok) exit 0 ;;
  exit*) exit "${STUB_DRIVER#exit}" ;;
  term) trap 'echo got-term > "$STUB_LOG/driver.term"; exit 143' TERM
        touch "$STUB_LOG/driver.ready"
        while :; do sleep 0.1; done ;;
esac
""",
}


class Job:
    """The script run as a SLURM job would run it, on stubs; `log` holds what the stubs saw."""

    def __init__(self, tmp_path: Path, script: Path = SCRIPT, **env: str):
        self.bin, self.log = tmp_path / "bin", tmp_path / "log"
        self.bin.mkdir(exist_ok=True)
        self.log.mkdir(exist_ok=True)
        for name, text in STUBS.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.tmpdir = Path(tempfile.mkdtemp(prefix="ob", dir="/tmp"))  # short, like a node's TMPDIR
        self.script = script
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "TMPDIR": str(self.tmpdir),
            "STUB_LOG": str(self.log),
            "STUB_NODES": "node1 node2",
            "SLURM_JOB_ID": str(JOB_ID),
            "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURMD_NODENAME": "node1",
            "SLURM_GPUS_PER_NODE": "h100:8",
            "OBLIVIATE_PYTHON": str(self.bin / "python"),
            "OBLIVIATE_TEARDOWN_S": "5",
            **env,
        }
        self.job_tmp = self.tmpdir / f"obliviate-{JOB_ID}"

    def cleanup(self):
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.script), *args], env=self.env, capture_output=True, text=True, timeout=120)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(self.script), *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read(self, name: str) -> str:
        path = self.log / name
        return path.read_text() if path.exists() else ""

    def driver_argv(self) -> list[str]:
        return self.read("driver.argv").split("\0")[:-1]

    def ray_args(self, role: str) -> list[str]:
        return self.read(f"ray-{role}.args").split()


@pytest.fixture
def job(tmp_path):
    made = []

    def make(**env):
        made.append(Job(tmp_path, **env))
        return made[-1]

    yield make
    for j in made:
        j.cleanup()


COMMAND = ["run", "configs/llama2-7b.yaml", "--baseline", "/m/base", "--out", "runs/r", "unlearn.lr=1e-6"]


def test_job_starts_ray_head_and_workers_runs_the_driver_and_tears_down(job):
    j = job()
    proc = j.run(*COMMAND)
    assert proc.returncode == 0, proc.stderr
    gcs = ports(JOB_ID)
    address = f"{HEAD_IP}:{gcs['PORT_GCS']}"
    assert j.driver_argv() == [*COMMAND, "--ray-address", address]
    head, worker = j.ray_args("head"), j.ray_args("worker")
    for expected in ("start", "--block", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs['PORT_GCS']}", "--include-dashboard=false", f"--temp-dir={j.job_tmp}", f"--min-worker-port={gcs['PORT_WORKER_MIN']}", f"--max-worker-port={gcs['PORT_WORKER_MAX']}", f"--node-manager-port={gcs['PORT_NODE_MANAGER']}", f"--ray-client-server-port={gcs['PORT_CLIENT']}"):
        assert expected in head, (expected, head)
    assert not any(a.startswith("--dashboard-host") for a in head)
    for expected in ("start", "--block", f"--address={address}", f"--node-ip-address={WORKER_IP}", f"--temp-dir={j.job_tmp}"):
        assert expected in worker, (expected, worker)
    assert "--head" not in worker
    assert set(j.read("ray-calls").split()) == {"start"}  # never `ray stop`
    srun = j.read("srun.log").splitlines()
    assert all("--overlap" in line for line in srun)
    assert any("-w node1" in line and "ray-node head" in line for line in srun)
    assert any("--exclude=node1" in line and "--nodes=1" in line and "ray-node worker" in line for line in srun)
    polls = [line.split() for line in j.read("poll.log").splitlines()]  # python - MODE ADDRESS DEADLINE NODES GPUS ...
    assert [p[1] for p in polls] == ["port", "cluster"]
    assert polls[1][2] == address and polls[1][4:6] == ["2", "16"]  # 2 nodes, 2 x h100:8 GPUs
    assert j.read("ray-head.stopped") and j.read("ray-worker.stopped")  # stopped through their srun steps
    assert not j.job_tmp.exists()
    assert not j.read("requeue")


def test_single_node_job_starts_no_workers(job):
    j = job(STUB_NODES="node1", SLURM_JOB_NODELIST="node1", SLURM_GPUS_PER_NODE="4")
    proc = j.run("demo")
    assert proc.returncode == 0, proc.stderr
    assert not j.read("ray-worker.args")
    assert j.read("poll.log").splitlines()[1].split()[4:6] == ["1", "4"]


def test_requeued_job_resumes(job):
    j = job(SLURM_RESTART_COUNT="1")
    assert j.run(*COMMAND).returncode == 0
    assert j.driver_argv()[-1] == "--resume"
    j.run(*COMMAND, "--resume")
    assert j.driver_argv().count("--resume") == 1
    proc = j.run(*COMMAND, "--overwrite")
    assert "--resume" not in j.driver_argv() and "starts over" in proc.stderr


@pytest.mark.parametrize("state, requeued", [("RUNNING", True), ("CANCELLED", False)])
def test_sigterm_is_forwarded_and_only_a_running_job_requeues(job, state, requeued):
    """Preemption (the job still RUNNING) requeues; a scancel (CANCELLED) must not bring the job back."""
    j = job(STUB_DRIVER="term", STUB_JOB_STATE=state)
    proc = j.start(*COMMAND)
    deadline = time.monotonic() + 60
    while not (j.log / "driver.ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert j.read("driver.term")
    if requeued:
        assert j.read("requeue").split() == ["requeue", str(JOB_ID)]
        assert j.read("ray-head.stopped") and not j.job_tmp.exists()
    else:
        assert not j.read("requeue") and "not requeueing" in err


def test_driver_exit_code_is_the_jobs(job):
    j = job(STUB_DRIVER="exit2")
    assert j.run(*COMMAND).returncode == 2
    assert not j.read("requeue") and j.read("ray-head.stopped")


def test_ray_that_never_comes_up_fails_and_still_tears_down(job):
    j = job(STUB_POLL_RC="1")
    proc = j.run(*COMMAND)
    assert proc.returncode == 1
    assert "stub poll failed" in proc.stderr
    assert not j.read("driver.argv")
    assert j.read("ray-head.stopped") and not j.job_tmp.exists()


def test_dashboard_only_on_loopback_when_asked(job):
    j = job(OBLIVIATE_DASHBOARD="1")
    proc = j.run(*COMMAND)
    assert proc.returncode == 0, proc.stderr
    head = j.ray_args("head")
    port = ports(JOB_ID)["PORT_DASHBOARD"]
    assert {"--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}"} <= set(head)
    assert f"ssh -L 8265:127.0.0.1:{port} node1" in proc.stderr


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"OBLIVIATE_HEAD_IP": "0.0.0.0"}, "wildcard"),
        ({"STUB_HEAD_IP": "127.0.1.1"}, "loopback"),
    ],
)
def test_head_address_refusals(job, env, fragment):
    j = job(**env)
    proc = j.run(*COMMAND)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert not j.read("ray-head.args")


def test_chosen_head_address_is_used(job):
    j = job(OBLIVIATE_HEAD_IP="10.1.2.3")
    assert j.run(*COMMAND).returncode == 0
    assert "--node-ip-address=10.1.2.3" in j.ray_args("head")
    assert f"--address=10.1.2.3:{ports(JOB_ID)['PORT_GCS']}" in j.ray_args("worker")


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        ((), {}, "usage"),
        (("eval", "--out", "r"), {}, "unknown command"),
        (("run", "--ray-address", "h:1"), {}, "--ray-address"),
        (("run", "--out", "r"), {"SLURM_JOB_ID": ""}, "not inside a SLURM job"),
    ],
)
def test_script_usage_errors(job, args, env, fragment):
    j = job(**env)
    proc = j.run(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and fragment in proc.stderr
    assert not j.read("srun.log")


def test_rendered_script_runs_its_baked_command(job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rendered = tmp_path / "job.sbatch"
    rendered.write_text(render(args=TRICKY, python="/nonexistent/python"))
    j = job()
    j.script = rendered
    proc = j.run()  # the command is baked in; OBLIVIATE_PYTHON from the environment wins
    assert proc.returncode == 0, proc.stderr
    assert j.driver_argv() == [*TRICKY, "--ray-address", f"{HEAD_IP}:{ports(JOB_ID)['PORT_GCS']}"]


# ---------------------------------------------------------------- submit, status, logs


def fake_tool(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/bin/bash\n" + body)
    (folder / name).chmod(0o755)


def test_submit_dry_run_writes_the_script_and_calls_nothing(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", "sbatch", f"touch {tmp_path}/called\necho 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    text = render()
    assert slurm.submit(text, tmp_path / "run", dry_run=True) == text
    assert (tmp_path / "run" / "slurm" / "job.sbatch").read_text() == text
    assert (tmp_path / "run" / "slurm-logs").is_dir()
    assert not (tmp_path / "called").exists()


def test_submit_calls_sbatch_parsable(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", "sbatch", f'echo "$*" > {tmp_path}/args\necho "777;cluster1"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert slurm.submit(render(), tmp_path / "run", dry_run=False) == "777"
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(tmp_path / "run" / "slurm" / "job.sbatch")]
    assert (tmp_path / "run" / "slurm" / "jobs").read_text() == "777\n"


def test_submit_reports_sbatch_refusal_in_one_line(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\necho more >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(UserError) as exc:
        slurm.submit(render(), tmp_path / "run", dry_run=False)
    assert "invalid partition specified" in one_line(exc)


def test_submit_and_wait_reports_the_id_at_once_and_returns_the_jobs_exit_code(tmp_path, monkeypatch):
    # Like sbatch --wait: the id first, then the job's exit code once it ends.
    fake_tool(tmp_path / "bin", "sbatch", f'echo "$*" > {tmp_path}/args\necho 778\n'
              f'for i in $(seq 100); do [[ -e {tmp_path}/seen ]] && exit 3; sleep 0.05; done\nexit 9\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    queued = []
    code = slurm.submit_and_wait(render(), tmp_path / "run", lambda job: (queued.append(job), (tmp_path / "seen").touch()))
    assert (queued, code) == (["778"], 3)  # on_queued ran before sbatch returned
    assert (tmp_path / "args").read_text().split() == ["--parsable", "--wait", str(tmp_path / "run" / "slurm" / "job.sbatch")]
    assert (tmp_path / "run" / "slurm" / "jobs").read_text() == "778\n"

    fake_tool(tmp_path / "bin", "sbatch", 'echo "sbatch: error: Batch job submission failed: Invalid account" >&2\nexit 1\n')
    with pytest.raises(UserError) as exc:
        slurm.submit_and_wait(render(), tmp_path / "run2", lambda job: pytest.fail("no job was queued"))
    assert one_line(exc) == "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid account"


def test_submit_without_sbatch_is_a_one_line_user_error(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError) as exc:
        slurm.submit(render(), tmp_path / "run", dry_run=False)
    assert one_line(exc).startswith("sbatch not found")
    assert not (tmp_path / "run").exists()


def test_status_and_logs(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError) as exc:
        slurm.status("12")
    assert "squeue and sacct not found" in one_line(exc)
    fake_tool(tmp_path / "bin", "squeue", 'echo "JOBID NAME STATE"\n[[ $2 == 12 ]] && echo "12 obliviate RUNNING"\nexit 0\n')
    fake_tool(tmp_path / "bin", "sacct", 'echo "JobID|JobName|State"\necho "$2|obliviate|COMPLETED"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert "RUNNING" in slurm.status("12")
    assert "13|obliviate|COMPLETED" in slurm.status("13")
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "jobs").write_text("12\n13\n")
    assert "13|obliviate|COMPLETED" in slurm.status(run)
    with pytest.raises(UserError) as exc:
        slurm.status(tmp_path / "nowhere")
    one_line(exc)
    with pytest.raises(UserError) as exc:
        slurm.logs(run)
    assert "no SLURM logs" in one_line(exc)
    (run / "slurm-logs").mkdir()
    (run / "slurm-logs" / "obliviate-12.out").write_text("old\n")
    os.utime(run / "slurm-logs" / "obliviate-12.out", (1, 1))
    (run / "slurm-logs" / "obliviate-13.out").write_text("\n".join(f"line {i}" for i in range(10)) + "\n")
    (run / "slurm-logs" / "obliviate-13.err").write_text("warn\n")
    text = slurm.logs(run, lines=3)
    assert "obliviate-13.out" in text and "line 9" in text and "line 6" not in text and "warn" in text and "old" not in text
    assert "old" in slurm.logs(run, job_id="12")
    with pytest.raises(UserError) as exc:
        slurm.logs(run, job_id="99")
    assert "12, 13" in one_line(exc)


@pytest.mark.parametrize("dashboard", ["0", "1"])
def test_ray_start_arguments_parse_with_the_installed_ray(job, dashboard):
    """Every flag the job gives `ray start` exists in this Ray and takes the value given (parsed, not run)."""
    from ray.scripts.scripts import start

    j = job(OBLIVIATE_DASHBOARD=dashboard, SLURM_CPUS_PER_TASK="16")
    assert j.run(*COMMAND).returncode == 0
    for role in ("head", "worker"):
        args = j.ray_args(role)
        assert args[0] == "start" and "--num-cpus=16" in args
        params = start.make_context("start", args[1:]).params
        assert params["block"] and params["node_ip_address"] in (HEAD_IP, WORKER_IP)
        assert params["head"] == (role == "head")
        if role == "head":
            assert params["include_dashboard"] == (dashboard == "1")
            assert params["dashboard_host"] == "127.0.0.1"  # Ray's default too; passed explicitly when on
