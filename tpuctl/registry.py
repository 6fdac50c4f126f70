"""The runs tpuctl started, recorded on this machine, so `status`, `logs`, `stop` and `attach` know them by name.

One JSON file per run in $XDG_STATE_HOME/tpuctl/runs/ (default ~/.local/state/tpuctl/runs/). A name may hold
anything (spaces, quotes); on the workers a run goes by its slug, a name safe for tmux and paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpuctl.errors import TpuctlError


@dataclass(frozen=True)
class RunRecord:
    name: str
    recipe: str  # relative to `cwd`
    workdir: str
    target: str  # "local" or "tpu"
    cwd: str  # where the trainer runs: the synced project on the workers, this project locally
    workers: list[str] = field(default_factory=list)  # the hosts at launch
    project: str | None = None
    zone: str | None = None
    tpu: str | None = None
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    recipe_sha256: str | None = None  # the recipe's content as `run` checked it
    code: dict[str, Any] | None = None  # tpuctl.codetree.CodeIdentity: the tree the workers held at the start, git

    @property
    def slug(self) -> str:
        return slug(self.name)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"slug": self.slug}


def slug(name: str) -> str:
    """A tmux- and path-safe form of a run name; names that needed changing get a short hash to stay distinct."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "run"
    if clean == name:
        return clean
    return f"{clean}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def state_dir() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(root) / "tpuctl" / "runs"


def save(record: RunRecord) -> Path:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.slug}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def find(name: str) -> RunRecord | None:
    path = state_dir() / f"{slug(name)}.json"
    if not path.exists():
        return None
    return _read(path)


def workdir_for(name: str, given: str | None, root: str) -> str:
    """A run's workdir: the one given, else the one it had before (the same name resumes there), else ROOT/SLUG."""
    if given:
        if re.match(r"^[a-z][a-z0-9+.-]*:/(?!/)", given):  # gs:/b/x: a shell or a path join ate a slash
            raise TpuctlError(f"--workdir {given} is not a bucket URL", "write it with two slashes: gs://BUCKET/PATH")
        return given
    previous = find(name)
    return previous.workdir if previous else f"{root}/{slug(name)}"


def load(name: str | None) -> RunRecord:
    """The run called `name`, or the latest one started when `name` is None."""
    if name is not None:
        record = find(name)
        if record is None:
            known = ", ".join(r.name for r in all_runs()[:8]) or "none yet"
            raise TpuctlError(f"no run named {name!r} was started from this machine", f"known runs: {known}")
        return record
    runs = all_runs()
    if not runs:
        raise TpuctlError("no run was started from this machine yet", "start one with `tpuctl run RECIPE`")
    return runs[0]


def all_runs() -> list[RunRecord]:
    """Every recorded run, the latest started first."""
    directory = state_dir()
    records = [_read(p) for p in directory.glob("*.json")] if directory.exists() else []
    return sorted(records, key=lambda r: r.started, reverse=True)


def _read(path: Path) -> RunRecord:
    try:
        data = json.loads(path.read_text())
        data.pop("slug", None)
        return RunRecord(**data)
    except (OSError, ValueError, TypeError) as e:
        raise TpuctlError(f"cannot read the run record {path}: {e}", "delete it if the run is gone") from None
