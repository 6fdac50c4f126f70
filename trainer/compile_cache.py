"""The persistent XLA compilation cache: where it lives, and how much of a start it saved.

By default it is a `compile_cache` folder next to the workdir (gs:// included): every host of a pod and every
restart of the run (a babysat preemption, a resume, the next stage) reads the programs the first start compiled, and
runs beside it in the same folder share theirs. JAX keys each program by its HLO, devices and compiler, so hosts
writing the same program at once write the same bytes; a bucket's object writes are whole or nothing.
"""

from __future__ import annotations

import os
from typing import Any

OFF = "off"
HIT = "/jax/compilation_cache/cache_hits"
REQUEST = "/jax/compilation_cache/compile_requests_use_cache"


def location(given: str | None, recipe_value: str, workdir: str) -> str | None:
    """The cache's folder: `given` (the --compile-cache flag or its environment variable; "" = none), else the
    recipe's `compile_cache` ("off" = none), else a `compile_cache` folder next to the workdir."""
    if given is not None:
        return os.path.expanduser(given) if given else None
    if recipe_value:
        return None if recipe_value == OFF else os.path.expanduser(recipe_value)
    from trainer import storage

    run = storage.at(workdir.rstrip("/"))
    bucket_root = storage.is_remote(workdir) and "/" not in workdir.split("://", 1)[1].strip("/")
    return os.fspath((run if bucket_root else run.parent) / "compile_cache")  # a bucket's root: inside it


class Counts:
    """The programs compiled so far through the cache, and how many of them it already held (jax.monitoring's
    events: one listener for the process)."""

    def __init__(self) -> None:
        self.hits = self.requests = 0

    def __call__(self, event: str, **_: Any) -> None:
        if event == HIT:
            self.hits += 1
        elif event == REQUEST:
            self.requests += 1


COUNTS = Counts()


def enable(where: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    jax.monitoring.register_event_listener(COUNTS)
