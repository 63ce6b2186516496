"""The Ray runner: a training phase as a DeepSpeed ZeRO-3 group of Ray workers fed by teacher processes.

    driver: RunControl actor (stop flag, progress) ◀──── rank 0 reports each step
    TeacherActor × T (the method's frozen models) ──▶ a bounded Queue per (rank, teacher) ──▶ TrainerGroup ranks: fit()

Each teacher (`engine.labelers` of them; WHP's teachers are its labelers) owns the blocks whose id ≡ its
index (mod T) — so it makes each block's targets once and serves later epochs from memory — and walks the
same `Schedule` the ranks train by: it makes its part of step k+1 while step k trains, and blocks when a
queue is full (backpressure). A rank takes one part from each of its T queues per step. Queues carry block
ids and compact per-block targets (int32 labels, a few floats), never logits.

Failures are sorted: a rank or a teacher that dies, or a queue that stalls past `engine.label_timeout_s`,
tears everything down and restarts the phase from its latest complete checkpoint (`engine.max_restarts`
times); any other error in a rank or a teacher (out of memory, a non-finite loss) is fatal: one line that
names the process and the cause, exit 1, the latest checkpoint kept for `--resume`. SIGINT/SIGTERM on the
driver make the ranks checkpoint at the end of the step and stop; `--resume` continues.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from queue import Empty
from typing import Any, Callable

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.queue import Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from configs import EngineConfig, TrainConfig
from configs.errors import Interrupted, RunFailed
from engine.models import load_tokenizer, pick_device
from engine.training.checkpoints import latest_step
from engine.training.job import PhaseResult, StopFlag, Teacher, TeacherSpec, TrainJob, check_interrupted, checkpoint_note, fit_job, throughput
from engine.training.loop import FitResult, TargetSource
from engine.training.runners.cluster import connect
from engine.training.runners.groups import SETUP_TIMEOUT_S, QueueStalled, TrainerGroup, WorkerLost, wait_all
from engine.training.schedule import Schedule

log = logging.getLogger("obliviate")


@ray.remote(num_cpus=0)
class RunControl:
    """What the driver and the ranks share: a stop request (signals on the driver) and rank 0's progress."""

    def __init__(self) -> None:
        self._stop = False
        self._progress = (0, 0, float("nan"))

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def report(self, step: int, total: int, loss: float) -> None:
        self._progress = (step, total, loss)

    def progress(self) -> tuple[int, int, float]:
        return self._progress


class _RemoteStop:
    """`fit`'s stop flag on a rank: asks the RunControl (fit OR-s it over the ranks every step)."""

    def __init__(self, control) -> None:
        self.control = control

    def is_set(self) -> bool:
        return ray.get(self.control.stop_requested.remote(), timeout=60)


class QueuedTargets:
    """A rank's `TargetSource`: the targets the teachers made ahead, in `Schedule.requests` order, one part
    from each teacher's queue."""

    def __init__(self, queues: list[Queue], timeout: float) -> None:
        self.queues, self.timeout = queues, timeout
        self._scalars: dict[str, float] = {}

    def __call__(self, block_ids: torch.Tensor) -> torch.Tensor:
        parts = []
        for index, queue in enumerate(self.queues):
            try:
                parts.append(queue.get(timeout=self.timeout))
            except Empty:
                raise QueueStalled(f"no targets from teacher {index} within {self.timeout:g} s (engine.label_timeout_s)") from None
        ids = torch.cat([part_ids for part_ids, _, _ in parts])
        targets = torch.cat([part_targets for _, part_targets, _ in parts])  # [n, ...] even when n = 0
        if set(ids.tolist()) != set(block_ids.tolist()):
            raise RuntimeError("the target stream is out of step with the trainer (different blocks)")
        self._scalars = {"labeler_tokens_per_s": sum(rate for _, _, rate in parts), "label_queue_depth": float(sum(q.qsize() for q in self.queues))}
        row = {block: i for i, block in enumerate(ids.tolist())}  # a block repeated in a step has one row
        chosen = targets[[row[block] for block in block_ids.tolist()]]
        return chosen.long() if chosen.dtype == torch.int32 else chosen

    def scalars(self) -> dict[str, float]:
        return self._scalars


@ray.remote(max_restarts=0)
class TeacherActor:
    """A method's frozen models in one process (WHP: baseline and reinforced, so the kernel sees both hidden
    states on one device)."""

    def __init__(self) -> None:
        _quiet_worker()
        self.teacher: Teacher | None = None

    def load(self, spec: TeacherSpec, device: str, dtype: torch.dtype) -> int:
        """Build the teacher (its pid for the logs). In a task, not the constructor: a bad input raised here
        reaches the driver as itself, not as a dead actor that would be restarted."""
        self.teacher = spec.build(torch.device(device), dtype)
        return os.getpid()

    def produce(self, n_blocks: int, train: TrainConfig, world_size: int, first_step: int, index: int, count: int, queues: list[Queue]) -> dict:
        return _produce(self.teacher, n_blocks, train, world_size, first_step, index, count, queues)


def _produce(teacher: Teacher, n_blocks: int, train: TrainConfig, world_size: int, first_step: int, index: int, count: int, queues: list[Queue]) -> dict:
    """Teacher `index`'s blocks (id ≡ index mod count) of every request the ranks will make from
    `first_step` on, each rank's part into its queue (`queues[rank]`)."""
    start = time.perf_counter()
    for shares in Schedule.make(n_blocks, train, world_size).requests(first_step):
        mine = [ids[ids % count == index] for ids in shares]
        units, busy = teacher.units_done, teacher.busy_seconds
        targets = teacher(torch.cat(mine))
        targets = targets.to(torch.int32) if targets.dtype == torch.int64 else targets  # token ids fit in 32 bits
        rate = (teacher.units_done - units) / max(teacher.busy_seconds - busy, 1e-9)
        for queue, ids, part in zip(queues, mine, targets.split([m.numel() for m in mine])):
            queue.put((ids, part, rate))
    wall = time.perf_counter() - start  # includes the time blocked on full queues
    return {"stats": teacher.stats(), "tokens_per_s": teacher.units_done / max(teacher.busy_seconds, 1e-9), "utilization": teacher.busy_seconds / max(wall, 1e-9)}


def _produce_on_shard(spec: TeacherSpec, dtype: torch.dtype, first_index: int, n_blocks: int, train: TrainConfig, world_size: int, first_step: int, count: int, queues: list[list[Queue]]) -> dict:
    """On each rank of a sharded teacher group: teacher `first_index + RANK`, its models ZeRO-3-sharded over the group."""
    _quiet_worker()
    index = first_index + int(os.environ["RANK"])
    return _produce(spec.build_sharded(dtype), n_blocks, train, world_size, first_step, index, count, [row[index] for row in queues])


def _quiet_worker() -> None:
    """Ray prefixes and forwards every line a worker prints: keep per-tensor progress bars and library
    deprecation chatter out of the driver's log."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _quietly(fn: Callable[..., Any], args: tuple) -> Any:
    _quiet_worker()
    return fn(*args)


def train_rank(job: TrainJob, targets: TargetSource | None, resume: bool, stop, progress: Callable[[int, int, float], None] | None) -> FitResult:
    """One rank of a DeepSpeed ZeRO-3 group (joined from torchrun-style env): every rank calls it alike."""
    from engine.training.zero import DeepSpeedBackend, ds_config_for, ensure_distributed, frozen_zero3, load_zero3_model

    ensure_distributed()
    dtype = job.torch_dtype(pick_device(job.device))
    ds_config = ds_config_for(job.train, torch.distributed.get_world_size(), dtype, user=job.deepspeed)
    frozen = {role: frozen_zero3(path, dtype, job.frozen_zero) for role, path in job.frozen_models().items()}
    for engine in frozen.values():
        engine.eval()
    model, scorer = job.scoring(load_zero3_model(job.init, ds_config, dtype), frozen)
    backend = DeepSpeedBackend(model, job.train, ds_config, tokenizer=load_tokenizer(job.init, "initial"), objective=job.objective, scorer=scorer)
    return fit_job(job, backend, targets, resume, stop, progress)


def _train_on_rank(job: TrainJob, queues: list[list[Queue]], control, resume: bool, target_timeout: float) -> FitResult:
    _quiet_worker()
    targets = QueuedTargets(queues[int(os.environ["RANK"])], target_timeout) if queues else None
    return train_rank(job, targets, resume, _RemoteStop(control), lambda step, total, loss: control.report.remote(step, total, loss))


class RayRunner:
    """Runs each training phase on `cfg.workers` Ray workers (DeepSpeed ZeRO-3) plus the job's teachers.

    Use as a context manager: Ray is connected to (or a local cluster started) at the first phase, after the
    inputs have been checked, and stays up for the later phases until the block ends.
    """

    def __init__(self, cfg: EngineConfig, device: str = "auto") -> None:
        self.cfg, self.device = cfg, device
        self._stack = ExitStack()
        self._connected = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _connect(self) -> None:
        if not self._connected:
            needed = (self.cfg.workers + self.cfg.labelers) * self.cfg.cpus_per_worker  # a local cluster fits ranks and teachers
            self._stack.enter_context(connect(self.cfg.ray_address or None, num_cpus=max(os.cpu_count() or 1, needed), dashboard=self.cfg.dashboard))
            self._connected = True

    def train(self, job: TrainJob, resume: bool) -> PhaseResult:
        self._connect()
        with StopFlag().installed() as stop:
            attempt = 0
            while True:
                try:
                    return self._attempt(job, resume or attempt > 0, stop)
                except WorkerLost as exc:
                    if stop.is_set():  # a terminal's Ctrl-C reaches the local cluster's workers too
                        raise Interrupted(f"{job.phase} interrupted ({exc}); the latest checkpoint is at step {latest_step(job.checkpoint_dir)}: rerun the same command with --resume", stop.signum) from exc
                    if attempt == self.cfg.max_restarts:
                        raise RunFailed(f"{job.phase}: {exc}; gave up after {attempt} restart(s) (engine.max_restarts)") from exc
                    attempt += 1
                    log.warning("%s: %s; restarting from step %d (restart %d of %d)", job.phase, exc, latest_step(job.checkpoint_dir), attempt, self.cfg.max_restarts)
                except RunFailed as exc:
                    raise RunFailed(f"{job.phase}: {exc}; {checkpoint_note(job)}") from None

    def on_ranks(self, fn: Callable[..., Any], *args: Any, what: str) -> list[Any]:
        """`fn(*args)` on a group laid out like the trainers (`engine.workers` ranks, one GPU each on GPU, one
        torch.distributed group), the results in rank order. A rank that dies or fails ends it with one line
        naming the rank (no restarts: the work has no checkpoint to resume from)."""
        self._connect()
        on_gpu = self.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        with TrainerGroup(self.cfg.workers, self.cfg.cpus_per_worker, 1 if on_gpu else 0, role=f"{what} rank") as group:
            log.info("%s: %d rank(s) on pids %s, Ray nodes %s", what, self.cfg.workers, group.pids(), group.node_ips())
            try:
                return group.run(_quietly, fn, args, timeout=None)
            except WorkerLost as exc:
                raise RunFailed(f"{what}: {exc}") from exc

    def _attempt(self, job: TrainJob, resume: bool, stop: StopFlag) -> PhaseResult:
        cfg = self.cfg
        on_gpu = self.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        first_step = latest_step(job.checkpoint_dir) if resume else 0
        with ExitStack() as stack:
            control = RunControl.remote()
            stack.callback(ray.kill, control)
            group = stack.enter_context(TrainerGroup(cfg.workers, cfg.cpus_per_worker, 1 if on_gpu else 0))
            queues: list[list[Queue]] = []  # [rank][teacher]
            named: dict = {}
            if job.teacher is not None:
                queues = [[Queue(maxsize=cfg.queue_depth, actor_options={"num_cpus": 0}) for _ in range(cfg.labelers)] for _ in range(cfg.workers)]
                for queue in (q for row in queues for q in row):
                    stack.callback(queue.shutdown, force=True)
                named = self._start_teachers(stack, job, queues, first_step, on_gpu)
            teacher_refs = list(named)
            log.info("%s: %d trainer rank(s) on pids %s%s%s", job.phase, cfg.workers, group.pids(), "".join(f", {named[r]}" for r in teacher_refs), f", resuming at step {first_step}" if first_step else "")
            log.info("%s: trainer ranks on Ray nodes %s", job.phase, group.node_ips())
            refs = group.start(_train_on_rank, job, queues, control, resume, cfg.label_timeout_s)
            named.update(zip(refs, group.names()))
            bar = stack.enter_context(tqdm(desc=job.phase, unit="step", initial=first_step, dynamic_ncols=True))
            results = wait_all(named, None, f"train {job.phase}", self._poller(bar, control, stop), required=refs)
            fit = results[refs[0]]
            check_interrupted(job, fit, stop)
            made = [results[r] if r in results else ray.get(r, timeout=SETUP_TIMEOUT_S) for r in teacher_refs]
        return self._result(job, fit, made)

    def _result(self, job: TrainJob, fit: FitResult, made: list[dict]) -> PhaseResult:
        if not made:
            phase = PhaseResult(fit, None, throughput(fit))
        else:
            rate, utilization = sum(m["tokens_per_s"] for m in made), sum(m["utilization"] for m in made) / len(made)
            phase = PhaseResult(fit, job.teacher.merge_stats([m["stats"] for m in made]), throughput(fit, rate, utilization))
        speed, role = phase.throughput, job.teacher.role if job.teacher else ""
        teachers = f"; waiting for targets {100 * speed['label_wait_fraction']:.1f}% of the time; {self.cfg.labelers} {role}(s): {speed['labeler_tokens_per_s']:.0f} tokens/s, busy {100 * speed['labeler_utilization']:.0f}%"
        log.info("%s: %d steps in %.1f s on %d worker(s): %.0f tokens/s%s", job.phase, fit.steps, fit.seconds, self.cfg.workers, speed["tokens_per_s"], teachers if made else "")
        return phase

    def _start_teachers(self, stack: ExitStack, job: TrainJob, queues: list[list[Queue]], first_step: int, on_gpu: bool) -> dict:
        """Start the teachers producing into `queues`: {result ref: name}. Unsharded, each teacher actor holds
        its frozen models whole on its device; with engine.labeler_shards = K, groups of K ranks share them
        under ZeRO-3 (a group per placement group, like the trainers)."""
        cfg, role = self.cfg, job.teacher.role
        device = torch.device("cuda" if on_gpu else "cpu")
        args = (job.input_ids.shape[0], job.train, cfg.workers, first_step)
        named: dict = {}
        if cfg.labeler_shards > 1:
            for first in range(0, cfg.labelers, cfg.labeler_shards):
                group = stack.enter_context(TrainerGroup(cfg.labeler_shards, cfg.cpus_per_worker, 1 if on_gpu else 0, role=role, first_index=first))
                refs = group.start(_produce_on_shard, job.teacher, job.torch_dtype(device), first, *args, cfg.labelers, queues)
                named.update(zip(refs, (f"{name} (ZeRO-3 shard {rank} of {cfg.labeler_shards})" for rank, name in enumerate(group.names()))))
            return named
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if on_gpu else {})}
        teacher_group = placement_group([dict(bundle) for _ in range(cfg.labelers)], strategy="PACK")
        stack.callback(remove_placement_group, teacher_group)
        if not teacher_group.wait(timeout_seconds=SETUP_TIMEOUT_S):
            raise RunFailed(f"the Ray cluster cannot place {cfg.labelers} {role}(s) × {bundle} beside the trainers within {SETUP_TIMEOUT_S:g} s; it has {ray.cluster_resources()}")
        teachers = [
            TeacherActor.options(
                num_cpus=cfg.cpus_per_worker,
                num_gpus=1 if on_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(teacher_group, placement_group_bundle_index=i),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cfg.cpus_per_worker)}},
            ).remote()
            for i in range(cfg.labelers)
        ]
        for teacher in teachers:
            stack.callback(ray.kill, teacher)
        pid_refs = [teacher.load.remote(job.teacher, device.type, job.torch_dtype(device)) for teacher in teachers]
        pids = wait_all({ref: f"{role} {i}" for i, ref in enumerate(pid_refs)}, SETUP_TIMEOUT_S, "load the frozen models")
        for i, (teacher, pid) in enumerate(zip(teachers, (pids[ref] for ref in pid_refs))):
            ref = teacher.produce.remote(*args, i, cfg.labelers, [row[i] for row in queues])
            named[ref] = f"{role} {i} (pid {pid})"
        return named

    @staticmethod
    def _poller(bar: tqdm, control, stop: StopFlag):
        """The driver's side while the ranks train: forward a stop request, draw rank 0's progress."""
        sent = False

        def poll() -> None:
            nonlocal sent
            if stop.is_set() and not sent:
                control.request_stop.remote()
                sent = True
            step, total, loss = ray.get(control.progress.remote(), timeout=60)
            if total:
                bar.total = total
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update(step - bar.n)

        return poll
