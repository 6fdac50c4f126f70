"""A short-lived record of each TPU's workers, so that a fleet command need not ask the Cloud TPU API every time
(importing the client library and the call: ~0.2 s of an `exec` that takes ~1 s on 32 workers).

An address from here is never trusted on its own: a fleet on recorded addresses connects only to workers that
present the host key tpuctl recorded for that address, and on any doubt (an unknown or different key, a worker that
cannot be reached) it asks the API and goes by its answer (tpuctl.fleet.Fleet's `refresh`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.cloud import Node, Worker

if TYPE_CHECKING:
    from tpuctl.config import Settings


def path(settings: Settings) -> Path:
    key = "|".join(str(v) for v in (settings.api_endpoint, settings.project, settings.zone, settings.tpu))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    return cache / "tpuctl" / "nodes" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def save(settings: Settings, node: Node) -> None:
    """Record the node as the API just described it (a READY node with its workers)."""
    if settings.node_cache_s <= 0:
        return
    target = path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"saved": time.time(), "node": node.to_json()}))
    os.replace(tmp, target)


def load(settings: Settings) -> Node | None:
    """The node as recorded less than node_cache_s ago, else None."""
    if settings.node_cache_s <= 0:
        return None
    try:
        raw = json.loads(path(settings).read_text())
        if not 0 <= time.time() - raw["saved"] < settings.node_cache_s:
            return None
        node = raw["node"]
        workers = tuple(Worker(**w) for w in node.pop("workers"))
        return Node(**{**node, "workers": workers, "labels": tuple(node["labels"].items())})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or unreadable: the API answers


def forget(settings: Settings) -> None:
    path(settings).unlink(missing_ok=True)
