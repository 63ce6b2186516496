"""Connect the driver to a Ray cluster: a given address, `RAY_ADDRESS`, or a local one started for the run.

A Ray cluster runs whatever code its clients send (docs/engine.md, Security), so a cluster we start binds to
loopback only, with the dashboard off unless asked for (and then on loopback too).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

import ray
from ray._private import ray_constants

from configs.errors import UserError

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # labels and token ids are small; Ray's default takes 30% of RAM
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with one line: `ray.init` on a dead address retries for minutes before it gives up."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise UserError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} within {timeout:g} s: {exc.strerror or exc}") from None


@contextmanager
def _loopback_env() -> Iterator[None]:
    """Keep a local cluster on 127.0.0.1 and without token auth, for the processes it spawns and for us,
    while we are connected.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a module constant at import; with it off, Ray takes
    loopback as the node address instead of the outward interface (docs/engine.md, CPU notes). Token
    auth would write ~/.ray/auth_token; a loopback cluster for one run does not need it (RAY_AUTH_MODE
    set by the user wins).
    """
    saved_env = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> Iterator[None]:
    """Connected for the block: to `address`, else `RAY_ADDRESS`, else to a local cluster started for the run.

    Only a cluster started here is shut down on exit; an existing one is just disconnected from. A driver
    already connected (`ray.is_initialized()`) is reused and left connected. `num_cpus` and `dashboard`
    apply to a local cluster only.
    """
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        try:
            yield
        finally:
            ray.shutdown()
        return
    with _loopback_env():
        extra = {"dashboard_host": "127.0.0.1"} if dashboard else {}
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=dashboard,
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
            **extra,
        )
        try:
            yield
        finally:
            ray.shutdown()
