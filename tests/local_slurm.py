"""A real SLURM on this machine for tests: munged, slurmctld and two slurmd "nodes" (n1, n2) on loopback.

Follows docs/engine.md: Debian's packages (installed here with apt-get when missing and we are
root), a slurm.conf outside /etc, daemons in the foreground started and stopped by their recorded PIDs
(never by name), munged stopped only if we started it.

    reason = LocalSlurm.unavailable()      # None, or why this machine cannot have one (skip with it)
    with LocalSlurm(tmp_dir) as cluster:   # daemons up, both nodes idle
        subprocess.run(["sbatch", ...], env=cluster.env)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "munged"]  # what the cluster and the tests run
NODES = ("n1", "n2")
CPUS_PER_NODE = 2
MUNGE_PID = Path("/run/munge/munged.pid")
START_TIMEOUT_S = 60


class SlurmUnavailable(RuntimeError):
    """Installing or starting the cluster failed on a machine that should have one (a test failure, not a skip)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class LocalSlurm:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []
        self._munged_pid: int | None = None  # set only when this object started munged

    @staticmethod
    def unavailable() -> str | None:
        """Why no SLURM can run here (root is needed, and apt-get when the packages are missing), or None
        after installing what was missing. Raises SlurmUnavailable when apt-get itself fails."""
        if os.geteuid() != 0:
            return "a local SLURM needs root (slurmd runs jobs as any user; munged and the install need it)"
        if all(_which(name) for name in PROGRAMS):
            return None
        if not _which("apt-get"):
            return f"no apt-get to install {' '.join(PACKAGES)}"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                raise SlurmUnavailable(f"{' '.join(argv[:2])} failed: {tail}")
        missing = [name for name in PROGRAMS if not _which(name)]
        if missing:
            raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} is still missing")
        return None

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        d = self.dir
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=obliviatetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MinJobAge=4",  # else `sbatch --wait` backs off to 42 s polls
            "MailProg=/bin/true",
            *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN" for n in NODES),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munged(self) -> None:
        if MUNGE_PID.is_file() and _alive(int(MUNGE_PID.read_text().split()[0] or 0)):
            return  # someone else's munged: use it, leave it running
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run([_which("mungekey") or "mungekey", "--create"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"], check=True)
        proc = subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {proc.stderr.strip() or proc.returncode}")
        self._munged_pid = int(MUNGE_PID.read_text().split()[0])

    def _spawn(self, *argv: str) -> None:
        log = open(self.dir / "log" / f"{Path(argv[0]).name}-{len(self._daemons)}.stdout", "w")
        self._daemons.append(subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self) -> None:
        self._write_conf()
        self._start_munged()
        self._spawn(_which("slurmctld"), "-D", "-c", "-f", str(self.conf))
        for node in NODES:
            self._spawn(_which("slurmd"), "-D", "-N", node, "-f", str(self.conf))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self._daemons if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{Path(dead[0]).name} exited at start: see {self.dir / 'log'}")
            idle = self.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).stdout.split()
            if len(set(idle)) == len(NODES):
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"the nodes were not idle within {START_TIMEOUT_S} s: see {self.dir / 'log'}")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        proc = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
        return proc

    def jobs(self) -> list[str]:
        """Ids of the jobs SLURM still knows (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def job_state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.split()
        return out[0] if out else ""

    def stop(self) -> None:
        """Cancel every job, then TERM the daemons we started (KILL after 10 s); munged only if we started it."""
        if self._daemons and all(p.poll() is None for p in self._daemons):
            self.run("scancel", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 30
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self._daemons):  # slurmds first, then slurmctld
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons = []
        if self._munged_pid is not None:
            try:
                os.kill(self._munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._munged_pid = None
