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
from typing import TYPE_CHECKING, Any

from tpuctl.cloud import Node, Worker

if TYPE_CHECKING:
    from tpuctl.config import Settings


def path(settings: Settings) -> Path:
    key = "|".join(str(v) for v in (settings.api_endpoint, settings.project, settings.zone, settings.tpu))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    return cache / "tpuctl" / "nodes" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def save(settings: Settings, node: Node, login_user: str | None = None) -> None:
    """Record the node as the API just described it (a READY node with its workers), and the user its workers were
    found to be logged in to as (OS Login's POSIX name)."""
    if settings.node_cache_s <= 0:
        return
    target = path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    record = {"saved": time.time(), "node": node.to_json(), **({"login_user": login_user} if login_user else {})}
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)


def _fresh(settings: Settings) -> dict[str, Any] | None:
    """The record made less than node_cache_s ago, else None."""
    if settings.node_cache_s <= 0:
        return None
    try:
        raw = json.loads(path(settings).read_text())
        return raw if 0 <= time.time() - raw["saved"] < settings.node_cache_s else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def login_user(settings: Settings) -> str | None:
    """The user the node's workers were logged in to as, where the record names one (OS Login)."""
    raw = _fresh(settings)
    user = raw.get("login_user") if raw else None
    return user if isinstance(user, str) else None


def load(settings: Settings) -> Node | None:
    """The node as recorded less than node_cache_s ago, else None."""
    raw = _fresh(settings)
    if raw is None:
        return None
    try:
        node = raw["node"]
        workers = tuple(Worker(**w) for w in node.pop("workers"))
        # metadata was recorded by key only (tpuctl.cloud.Node.to_json): no values to give back
        return Node(**{**node, "workers": workers, "labels": tuple(node["labels"].items()), "metadata": ()})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or unreadable: the API answers


def forget(settings: Settings) -> None:
    path(settings).unlink(missing_ok=True)
