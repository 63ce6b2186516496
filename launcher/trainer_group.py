"""A group of Ray actors that form one torch.distributed group (the OpenRLHF pattern in the design notes).

Each actor gets the torchrun-style env that `engine.zero.ensure_distributed` joins from, so the same
training code runs under Ray as under torchrun or the tests' subprocess launcher.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.errors import UserError

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


class TrainerGroup:
    """`num_workers` Ray actors in one placement group, with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/
    MASTER_ADDR/MASTER_PORT set; use as a context manager so no actor outlives the group.

    On GPU each actor sees only its own GPUs (CUDA_VISIBLE_DEVICES narrowed to Ray's ids: actors
    otherwise can all land on GPU 0, design notes "What bites" 4), so LOCAL_RANK is 0 — the index of its
    device — as in OpenRLHF, and DeepSpeed's `set_device(LOCAL_RANK)` picks the right one. On CPU
    LOCAL_RANK is the rank among the group's workers on the same node, DS_ACCELERATOR=cpu and
    OMP_NUM_THREADS=cpus_per_worker.
    """

    def __init__(self, num_workers: int, cpus_per_worker: float = 1, gpus_per_worker: float = 0, setup_timeout: float = SETUP_TIMEOUT_S):
        if num_workers < 1:
            raise UserError(f"a trainer group needs at least one worker, got {num_workers}")
        self.num_workers = num_workers
        self._actors: list[Any] = []
        self._pids: list[int] = []
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

    def _get(self, refs: list, timeout: float, what: str) -> list:
        """Results in rank order; the first failure (or the deadline) raises naming the rank(s).

        Waits on all refs at once so a dead rank is reported as soon as Ray notices, even while the other
        ranks sit in a collective waiting for it.
        """
        deadline = time.monotonic() + timeout
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                missing = sorted(rank_of[r] for r in pending)
                raise TimeoutError(f"trainer rank(s) {missing} did not {what} within {timeout:g} s")
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except RayActorError as exc:
                    pid = f" (pid {self._pids[rank]})" if self._pids else ""
                    raise RuntimeError(f"trainer rank {rank}{pid} died during {what}: {type(exc).__name__}") from exc
                except RayTaskError as exc:
                    raise RuntimeError(f"trainer rank {rank} failed during {what}: {exc.cause!r}") from exc
                except GetTimeoutError as exc:
                    raise TimeoutError(f"trainer rank {rank} did not {what} within {timeout:g} s") from exc
        return [results[rank] for rank in range(len(refs))]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float, **kwargs: Any) -> list[Any]:
        """`fn(*args, **kwargs)` on every worker at once; the return values in rank order.

        A worker that dies or raises, or the deadline passing, raises naming the rank. The other ranks may
        then be stuck in a collective: the group is unusable afterwards, shut it down.
        """
        return self._get([a.run.remote(fn, args, kwargs) for a in self._actors], timeout, f"run {getattr(fn, '__name__', fn)}")

    def pids(self) -> list[int]:
        return list(self._pids)

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
