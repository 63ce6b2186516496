"""A group of Ray actors that form one torch.distributed group (the OpenRLHF pattern, docs/engine.md).

Each actor gets the torchrun-style env that `engine.training.zero.ensure_distributed` joins from, so the same
training code runs under Ray as under torchrun or the tests' subprocess launcher.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs.errors import Interrupted, RunFailed, UserError, first_line

SETUP_TIMEOUT_S = 120.0  # placement + actor start; a cluster still waiting for nodes fails here, not later


@ray.remote(max_restarts=0)  # a rank restarted alone would wait forever for a group that is gone
class _Worker:
    """One rank. Holds no state but its env: the function it runs builds the engine."""

    def __init__(self, cpu_threads: int | None):
        """`cpu_threads` is None on GPU. Set before anything in this fresh process imports torch, which reads it once."""
        if cpu_threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(cpu_threads)
            os.environ["DS_ACCELERATOR"] = "cpu"

    def describe(self) -> tuple[str, str, int, list[str]]:
        """(node id, node IP, pid, own GPU ids): what the driver needs to assign ranks and addresses."""
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid(), ctx.get_accelerator_ids().get("GPU", [])

    def free_port(self) -> int:
        """A port free on rank 0's node, for MASTER_PORT (it may be taken again before torch binds it; rare)."""
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def set_env(self, env: dict[str, str]) -> None:
        os.environ.update(env)

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return fn(*args, **kwargs)


def _strategy(num_workers: int, cpus: float, gpus: float) -> str:
    """STRICT_PACK when one alive node can hold every worker (local collectives, one MASTER_ADDR hop);
    otherwise PACK, which still uses as few nodes as it can. SPREAD would buy nothing for a job that must
    restart when any rank dies."""
    for node in ray.nodes():
        total = node.get("Resources", {})
        if node.get("Alive") and total.get("CPU", 0) >= num_workers * cpus and total.get("GPU", 0) >= num_workers * gpus:
            return "STRICT_PACK"
    return "PACK"


class WorkerLost(RuntimeError):
    """A trainer rank or a teacher process died (killed, OOM-killed, node lost) or a queue between them
    stalled: the run can restart from a checkpoint."""


class QueueStalled(WorkerLost):
    """A rank waited past `engine.label_timeout_s` for a teacher's targets (raised inside the rank)."""


def wait_all(
    named: dict[Any, str], timeout: float | None, what: str, poll: Callable[[], None] | None = None, required: list | None = None, poll_every: float = 1.0
) -> dict[Any, Any]:
    """Results of Ray refs (named for errors) once all `required` ones (default: all) are done; the first
    failure of any of them, or the deadline, raises.

    Waits on all refs at once so a dead process is reported as soon as Ray notices, even while the others
    sit in a collective waiting for it. `poll()` runs every `poll_every` seconds meanwhile (progress, stop
    requests); the short waits also let the driver's signal handlers run.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    required = list(named) if required is None else required
    results: dict[Any, Any] = {}
    pending = list(named)
    while any(ref not in results for ref in required):
        wait = poll_every if deadline is None else max(0.0, min(poll_every, deadline - time.monotonic()))
        ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
        if poll is not None:
            poll()
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{', '.join(named[r] for r in pending)} did not {what} within {timeout:g} s")
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except RayActorError as exc:
                raise WorkerLost(f"{named[ref]} died during {what}: {type(exc).__name__}") from exc
            except RayTaskError as exc:
                raise _sorted(exc.cause, named[ref], what) from None
    return results


def _sorted(cause: BaseException, name: str, what: str) -> Exception:
    """A worker's exception as the driver raises it: the user's own errors as they are, a stalled queue as
    restartable, anything else (out of memory, a non-finite loss, a bug) as fatal, naming the worker."""
    if isinstance(cause, (UserError, Interrupted)):
        return cause
    if isinstance(cause, WorkerLost):
        return WorkerLost(f"{name}: {cause}")
    text = first_line(cause)
    if isinstance(cause, RunFailed):
        return RunFailed(f"{name} failed during {what}: {text}")
    return RunFailed(f"{name} failed during {what}: {type(cause).__name__}" + (f": {text}" if text != type(cause).__name__ else ""))


class TrainerGroup:
    """`num_workers` Ray actors in one placement group, with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/
    MASTER_ADDR/MASTER_PORT set; use as a context manager so no actor outlives the group.

    On GPU each actor sees only its own GPUs (CUDA_VISIBLE_DEVICES narrowed to Ray's ids: actors
    otherwise can all land on GPU 0, docs/engine.md "Pitfalls"), so LOCAL_RANK is 0 — the index of its
    device — as in OpenRLHF, and DeepSpeed's `set_device(LOCAL_RANK)` picks the right one. On CPU
    LOCAL_RANK is the rank among the group's workers on the same node, DS_ACCELERATOR=cpu and
    OMP_NUM_THREADS=cpus_per_worker.
    """

    def __init__(self, num_workers: int, cpus_per_worker: float = 1, gpus_per_worker: float = 0, setup_timeout: float = SETUP_TIMEOUT_S, *, role: str = "trainer rank", first_index: int = 0):
        """`role` and `first_index` name the workers in errors and logs ("labeler 4" for rank 0 of a group from 4)."""
        if num_workers < 1:
            raise UserError(f"a trainer group needs at least one worker, got {num_workers}")
        self.num_workers, self.role, self.first_index = num_workers, role, first_index
        self._actors: list[Any] = []
        self._pids: list[int] = []
        self._node_ips: list[str] = []
        bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        strategy = _strategy(num_workers, cpus_per_worker, gpus_per_worker)
        self._pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy)
        try:
            if not self._pg.wait(timeout_seconds=setup_timeout):
                raise UserError(f"the Ray cluster cannot place {num_workers} workers × {bundle} ({strategy}) within {setup_timeout:g} s; it has {ray.cluster_resources()}")
            cpu_threads = None if gpus_per_worker else max(1, int(cpus_per_worker))
            self._actors = [
                _Worker.options(
                    num_cpus=cpus_per_worker,
                    num_gpus=gpus_per_worker,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
                ).remote(cpu_threads)
                for rank in range(num_workers)
            ]
            info = self._get([a.describe.remote() for a in self._actors], setup_timeout, "start")
            self._pids = [pid for _, _, pid, _ in info]
            self._node_ips = [ip for _, ip, _, _ in info]
            master_addr = info[0][1]
            master_port = self._get([self._actors[0].free_port.remote()], setup_timeout, "pick a port")[0]
            envs = self._envs(info, master_addr, master_port, on_gpu=bool(gpus_per_worker))
            self._get([a.set_env.remote(env) for a, env in zip(self._actors, envs)], setup_timeout, "set up")
        except BaseException:
            self.shutdown()
            raise

    def _envs(self, info: list[tuple[str, str, int, list[str]]], master_addr: str, master_port: int, on_gpu: bool) -> list[dict[str, str]]:
        node_ranks: dict[str, list[int]] = {}
        for rank, (node_id, _, _, _) in enumerate(info):
            node_ranks.setdefault(node_id, []).append(rank)
        envs = []
        for rank, (node_id, _, _, gpu_ids) in enumerate(info):
            same_node = node_ranks[node_id]
            env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(self.num_workers),
                "LOCAL_RANK": "0" if on_gpu else str(same_node.index(rank)),
                "LOCAL_WORLD_SIZE": str(len(same_node)),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
            }
            if on_gpu:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
            envs.append(env)
        return envs

    def _get(self, refs: list, timeout: float | None, what: str) -> list:
        results = wait_all(dict(zip(refs, self.names())), timeout, what)
        return [results[ref] for ref in refs]

    def names(self) -> list[str]:
        """How errors name each rank: "trainer rank 1 (pid 4242)"."""
        return [f"{self.role} {self.first_index + rank}" + (f" (pid {pid})" if pid else "") for rank, pid in enumerate(self._pids or [0] * self.num_workers)]

    def start(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
        """`fn(*args, **kwargs)` on every worker at once; the result refs in rank order (see `wait_all`)."""
        return [a.run.remote(fn, args, kwargs) for a in self._actors]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None, **kwargs: Any) -> list[Any]:
        """`fn(*args, **kwargs)` on every worker at once; the return values in rank order.

        A worker that dies or raises, or the deadline passing, raises naming the rank. The other ranks may
        then be stuck in a collective: the group is unusable afterwards, shut it down.
        """
        return self._get(self.start(fn, *args, **kwargs), timeout, f"run {getattr(fn, '__name__', fn)}")

    def pids(self) -> list[int]:
        return list(self._pids)

    def node_ips(self) -> list[str]:
        """Each rank's Ray node address, in rank order (run.log shows where a multi-node group landed)."""
        return list(self._node_ips)

    def shutdown(self) -> None:
        """Kill the actors (even mid-collective) and free their placement group; safe to call twice."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
