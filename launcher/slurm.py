"""SLURM: render slurm/obliviate.sbatch for one obliviate command, submit it, look at the job.

    script = render(["run", "configs/llama2-7b.yaml", "--baseline", "DIR", "--out", "RUN"], nodes=2,
                    gpus_per_node=8, partition="gpu", time="24:00:00", account=None, job_name="obliviate", run_dir=RUN)
    job_id = submit(script, run_dir, dry_run=False)   # RUN/slurm/job.sbatch, sbatch --parsable
    exit_code = submit_and_wait(script, run_dir, on_queued=print)     # sbatch --wait: until the job ends

The rendered script is the template with its `#SBATCH` header replaced (nodes, GPUs, requeue, the
time-limit signal, logs into RUN/slurm-logs) and the command line baked in, shell-quoted. The job starts
its own Ray cluster (head on the first node) and runs the command with `--ray-address`; see slurm/README.md.
Every problem is a one-line `UserError`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from configs.errors import UserError, first_line

COMMANDS = ("run", "reinforce", "unlearn", "demo", "compare")
TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "obliviate.sbatch"
HEADER_OPEN, HEADER_CLOSE = "# >>> sbatch header", "# <<< sbatch header"
BAKED_OPEN, BAKED_CLOSE = "# >>> baked by obliviate submit", "# <<< baked by obliviate submit"
LOG_DIR = "slurm-logs"
SCRIPT_PATH = Path("slurm") / "job.sbatch"  # inside the run directory
JOBS_FILE = Path("slurm") / "jobs"  # job ids submitted for the run directory, one a line
TERM_LEAD_S = 120  # SIGTERM this long before the time limit: the driver checkpoints, the job requeues
SBATCH_TIMEOUT_S = 120
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.,:@+=/\-\[\]]+")


# sbatch's --time formats (see `man sbatch`)
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)


def _check_word(name: str, value: str | None) -> None:
    """An sbatch option value written into `#SBATCH --name=value`: one plain word."""
    if value is None:
        return
    if not isinstance(value, str) or not value or not _PLAIN_VALUE.fullmatch(value):
        raise UserError(f"--{name} {value!r}: give one word of letters, digits and _.,:@+=/-[]")


def _sbatch_path(path: Path, pattern: str = "") -> str:
    """A path (+ a SLURM filename pattern like `/%x-%j.out`) as an `#SBATCH` value: the path's own `%`
    escaped as `%%`, the whole double-quoted when it holds white space."""
    text = str(path)
    if any(c in text for c in '"\n\r\\'):
        raise UserError(f"the path {text!r} holds a quote, backslash or newline, which #SBATCH lines cannot carry: use another directory")
    text = text.replace("%", "%%") + pattern
    return f'"{text}"' if re.search(r"\s", text) else text


def normalize_command(argv: Sequence[str]) -> list[str]:
    """`obliviate submit`'s command line: COMMAND [ARGS]..., where a leading CONFIG.yaml means `run CONFIG.yaml`."""
    argv = list(argv)
    if argv and argv[0] not in COMMANDS and (argv[0].endswith((".yaml", ".yml")) or argv[0].startswith("-") or "=" in argv[0]):
        argv = ["run", *argv]
    return argv


def check_command(command_args: Sequence[str]) -> None:
    if not command_args:
        raise UserError(f"no command to submit: give one of {', '.join(COMMANDS)}, then its arguments")
    if command_args[0] not in COMMANDS:
        raise UserError(f"cannot submit {command_args[0]!r}: give one of {', '.join(COMMANDS)}, then its arguments")
    if any(arg == "--ray-address" or arg.startswith("--ray-address=") for arg in command_args):
        raise UserError("drop --ray-address: the job starts its own Ray cluster and passes its address")
    if any("\0" in arg for arg in command_args):
        raise UserError("an argument holds a NUL character")


def check_fits(command: str, workers: int, labelers: int, nodes: int, gpus_per_node: int) -> None:
    """Refuse, before queueing, a GPU job too small for the config's trainer ranks (+ labelers to unlearn)."""
    if gpus_per_node <= 0 or command == "demo":
        return
    needed = workers + (labelers if command in ("run", "unlearn", "compare") else 0)
    have = nodes * gpus_per_node
    if needed > have:
        raise UserError(f"{command} needs {needed} GPUs (engine.workers={workers}" + (f" + engine.labelers={labelers}" if needed > workers else "") + f") but --nodes {nodes} x --gpus-per-node {gpus_per_node} gives {have}")


def _replace_block(text: str, opening: str, closing: str, lines: list[str]) -> str:
    """Replace the lines between the marker lines starting with `opening` and `closing` (kept)."""
    rows = text.split("\n")
    starts = [i for i, row in enumerate(rows) if row.startswith(opening)]
    ends = [i for i, row in enumerate(rows) if row.startswith(closing)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise UserError(f"{TEMPLATE} lacks one '{opening}' line followed by one '{closing}' line: the template is damaged")
    return "\n".join(rows[: starts[0] + 1] + lines + rows[ends[0] :])


def render(
    command_args: list[str],
    nodes: int,
    gpus_per_node: int,
    partition: str | None,
    time: str | None,
    account: str | None,
    job_name: str,
    extra_sbatch: Sequence[str] = (),
    *,
    run_dir: Path,
    cpus_per_task: int | None = None,
    python: str | None = None,
) -> str:
    """The job script: slurm/obliviate.sbatch with an `#SBATCH` header for these resources and the command
    line baked in (shell-quoted). `run_dir` is the command's run directory (the config's `out`); its
    `slurm-logs` folder gets the job's stdout/stderr. `python` (default: this interpreter) is where the job finds
    `ray` and `obliviate`, unless OBLIVIATE_PYTHON is set when it runs."""
    command_args = [str(arg) for arg in command_args]
    check_command(command_args)
    if not isinstance(nodes, int) or nodes < 1:
        raise UserError(f"--nodes {nodes}: give at least 1")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {gpus_per_node}: give 0 or more")
    if cpus_per_task is not None and (not isinstance(cpus_per_task, int) or cpus_per_task < 1):
        raise UserError(f"--cpus-per-task {cpus_per_task}: give at least 1")
    for name, value in (("partition", partition), ("time", time), ("account", account), ("job-name", job_name)):
        _check_word(name, value)
    if time is not None and not _TIME.fullmatch(time):
        raise UserError(f"--time {time!r}: give minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (or UNLIMITED)")
    if not job_name:
        raise UserError("--job-name: give a name")
    for option in extra_sbatch:
        if not isinstance(option, str) or not option.startswith("-") or any(c in option for c in "\n\r\0"):
            raise UserError(f"sbatch option {option!r}: give options like --constraint=a100, one per line")
    if not TEMPLATE.is_file():
        raise UserError(f"the job template {TEMPLATE} is missing: reinstall obliviate from its source tree")

    cwd = Path.cwd()
    logs = (cwd / Path(run_dir)).resolve() / LOG_DIR
    header = [f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if gpus_per_node > 0:
        header.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if cpus_per_task is not None:
        header.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    header += [f"#SBATCH --{name}={value}" for name, value in (("partition", partition), ("time", time), ("account", account)) if value]
    header += [
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:TERM@{TERM_LEAD_S}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={_sbatch_path(cwd)}",
        f"#SBATCH --output={_sbatch_path(logs, '/%x-%j.out')}",
        f"#SBATCH --error={_sbatch_path(logs, '/%x-%j.err')}",
    ]
    header += [f"#SBATCH {option}" for option in extra_sbatch]
    python = python or sys.executable
    baked = [
        f"# {datetime.now().astimezone().isoformat(timespec='seconds')}: `obliviate submit` from {shlex.quote(str(cwd))}",
        f"if [[ -z ${{OBLIVIATE_PYTHON:-}} ]]; then OBLIVIATE_PYTHON={shlex.quote(python)}; fi",
        "set -- " + " ".join(shlex.quote(arg) for arg in command_args),
    ]
    text = TEMPLATE.read_text()
    text = _replace_block(text, HEADER_OPEN, HEADER_CLOSE, header)
    return _replace_block(text, BAKED_OPEN, BAKED_CLOSE, baked)


def _write_script(script_text: str, run_dir: Path) -> Path:
    """RUN/slurm/job.sbatch (and RUN/slurm-logs, which sbatch will not make)."""
    script = Path(run_dir) / SCRIPT_PATH
    try:
        script.parent.mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / LOG_DIR).mkdir(parents=True, exist_ok=True)
        script.write_text(script_text)
    except OSError as exc:
        raise UserError(f"cannot write {script}: {exc.strerror or exc}") from None
    return script


def _sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found: submit from a SLURM login node, or use --dry-run and `sbatch RUN/slurm/job.sbatch` there")
    return sbatch


def _record_job(stdout: str, stderr: str, run_dir: Path) -> str:
    """The job id from `sbatch --parsable`'s output ("id" or "id;cluster"), appended to RUN/slurm/jobs."""
    lines = stdout.strip().splitlines()
    job_id = lines[-1].split(";")[0].strip() if lines else ""
    if not job_id:
        raise UserError(f"sbatch printed no job id: {first_line(stderr) or 'nothing'}")
    try:
        with open(Path(run_dir) / JOBS_FILE, "a") as f:
            f.write(job_id + "\n")
    except OSError:
        pass  # the job is queued; only `status RUN` loses track of it
    return job_id


def submit(script_text: str, run_dir: Path, dry_run: bool) -> str:
    """Write the script to RUN/slurm/job.sbatch, then `sbatch --parsable` it: the job id. With `dry_run`,
    write and return the script, calling nothing."""
    sbatch = None if dry_run else _sbatch()
    script = _write_script(script_text, run_dir)
    if dry_run:
        return script_text
    try:
        proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch did not answer within {SBATCH_TIMEOUT_S} s: is the SLURM controller up?") from None
    except OSError as exc:
        raise UserError(f"cannot run sbatch: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the job: {first_line(proc.stderr) or f'exit code {proc.returncode}'}")
    return _record_job(proc.stdout, proc.stderr, run_dir)


def submit_and_wait(script_text: str, run_dir: Path, on_queued: Callable[[str], None]) -> int:
    """`sbatch --parsable --wait`: `on_queued(job id)` as soon as SLURM took the job, then block until it ends
    (through requeues) and return its exit code, as sbatch reports it."""
    sbatch = _sbatch()
    script = _write_script(script_text, run_dir)
    try:
        proc = subprocess.Popen([sbatch, "--parsable", "--wait", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise UserError(f"cannot run sbatch: {exc.strerror or exc}") from None
    first = proc.stdout.readline()  # sbatch prints the id, flushed, before it starts waiting
    if not first.strip():
        stderr = proc.communicate()[1]
        raise UserError(f"sbatch refused the job: {first_line(stderr) or f'exit code {proc.returncode}'}")
    on_queued(_record_job(first, "", run_dir))
    proc.communicate()
    return proc.returncode


def _job_id(job: str | Path) -> str:
    """A job id, or a run directory whose RUN/slurm/jobs names its latest job."""
    text = str(job).strip()
    if re.fullmatch(r"\d+(_\d+)?", text):
        return text
    jobs = Path(text) / JOBS_FILE
    if jobs.is_file():
        ids = jobs.read_text().split()
        if ids:
            return ids[-1]
    raise UserError(f"{text!r} is neither a SLURM job id nor a run directory with {JOBS_FILE}")


def _run_tool(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError(f"{Path(argv[0]).name} did not answer within 60 s: is the SLURM controller up?") from None
    except OSError as exc:
        raise UserError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def status(job_id: str | Path) -> str:
    """The job's state: from squeue while it is queued or running, else from sacct (accounting)."""
    job = _job_id(job_id)
    squeue, sacct = shutil.which("squeue"), shutil.which("sacct")
    if squeue is None and sacct is None:
        raise UserError("squeue and sacct not found: run obliviate status on a SLURM login node")
    if squeue:
        proc = _run_tool([squeue, "--jobs", job, "--format", "%.18i %.24j %.10T %.10M %.10l %.6D %R"])
        rows = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and len(rows) > 1:
            return "\n".join(rows)
    if sacct:
        proc = _run_tool([sacct, "--jobs", job, "--allocations", "--parsable2", "--format", "JobID,JobName,State,Elapsed,ExitCode,NNodes,NodeList,Restarts"])
        rows = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and len(rows) > 1:
            return "\n".join(rows)
        if proc.returncode != 0 and not squeue:
            raise UserError(f"sacct failed: {first_line(proc.stderr) or f'exit code {proc.returncode}'}")
    raise UserError(f"job {job} is unknown to squeue and sacct (finished jobs leave squeue after a few minutes; accounting may be off)")


def logs(run_dir: Path, job_id: str | None = None, lines: int = 100) -> str:
    """The last `lines` lines of a job's stdout and stderr in RUN/slurm-logs (default: the newest job's)."""
    folder = Path(run_dir) / LOG_DIR
    files = sorted(folder.glob("*.out")) + sorted(folder.glob("*.err")) if folder.is_dir() else []
    if not files:
        raise UserError(f"no SLURM logs in {folder}: was the job submitted with obliviate submit, and has it started?")

    def job_of(path: Path) -> str:
        return path.stem.rpartition("-")[2]

    if job_id is None:
        job_id = job_of(max(files, key=lambda p: p.stat().st_mtime))
    chosen = [p for p in files if job_of(p) == str(job_id)]
    if not chosen:
        known = sorted({job_of(p) for p in files})
        raise UserError(f"no logs of job {job_id} in {folder}; it has jobs {', '.join(known)}")
    parts = []
    for path in sorted(chosen, key=lambda p: p.suffix != ".out"):
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        parts.append(f"==> {path} <==\n" + "\n".join(text[-lines:] if lines > 0 else text))
    return "\n\n".join(parts)
