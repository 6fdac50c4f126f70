"""Real stand-ins for the cloud (sshd "TPU workers" on loopback, a local Cloud TPU API server, a GCS emulator) and
the few helpers the tests share: a free port, waiting on a condition, trainers joined by jax.distributed."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port free on `ip` now (the kernel also refuses one a wildcard listener holds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def coordinator_port() -> int:
    """A port for a stand-in pod's jax.distributed coordinator. JAX's coordinator listens on every address ([::]), so
    two pods' coordinators on one machine (parallel tests) must not share a port: at the default 8476 one pod's
    worker 1 would join the other's, and a pod's coordinator could not start. Below the ephemeral range (no client
    socket takes it meanwhile), free now."""
    while True:
        port = 10_000 + secrets.randbelow(20_000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("0.0.0.0", port))  # refused while anything listens on the port, at any address
            return port
        except OSError:
            continue


def wait_until(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    detail: Callable[[], str] | None = None,
    poll: float = 0.05,
) -> T:
    """Poll `condition` until it returns something truthy, and return that; after `timeout` seconds fail the test
    naming `what` did not happen (and `detail()`, e.g. a log's tail, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s" + (f"\n{detail()}" if detail else ""))
        time.sleep(poll)


def cpu_env(devices: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a JAX process of the tests (`base`, else this one's) on `devices` CPU devices, with the
    session's XLA flags (conftest) kept."""
    env = dict(os.environ if base is None else base)
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def run_distributed(command: list[str], env: dict[str, str], cwd: Path, timeout: float, count: int = 2) -> list[str]:
    """`python -m trainer ...` as `count` processes joined by jax.distributed on this machine (the hosts of a pod),
    to their end: each one's output (stdout and stderr), after checking that every one exited 0. None outlives it."""
    from standins import warm

    wiring = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(count), "--process-id"]
    procs = [
        warm.popen(
            [*command, *wiring, str(i)], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(count)
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * count, "\n".join(out[-3000:] for out in outs)
    return outs
