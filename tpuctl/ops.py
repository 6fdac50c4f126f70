"""Fleet operations with structured per-worker answers: check, kill, clean-logs, prepare.

Each sends one command from tpuctl.remote to every worker and parses the JSON the worker script prints. A worker
that cannot be reached, or whose answer cannot be read, is "unknown": never "free".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpuctl import remote
from tpuctl.config import how_to_set
from tpuctl.defaults import KILL_GRACE_S
from tpuctl.errors import EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN, ConfigError

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.fleet import Fleet as SshFleet
    from tpuctl.fleet import WorkerResult
    from tpuctl.local import LocalFleet

    Fleet = SshFleet | LocalFleet  # the workers of a pod, or this machine as one

# Bounds for the chip scripts: they scan /proc, so seconds; kill adds the TERM grace and the KILL wait.
CHIPS_TIMEOUT_S = 60.0


@dataclass
class WorkerReport:
    """A worker's parsed answer; `error` set (and `state` "unknown") when there is none."""

    index: int
    ip: str
    state: str = "unknown"  # free | busy | unknown (chips); ok | failed (prepare)
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def holders(self) -> list[dict[str, Any]]:
        return list(self.data.get("holders", []))


def report(r: WorkerResult) -> WorkerReport:
    report = WorkerReport(index=r.worker.index, ip=r.host)
    if r.error is not None:
        report.error = r.error
        return report
    try:
        report.data = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        detail = (r.stderr.strip().splitlines() or [f"exit {r.exit_code}, no answer"])[-1]
        report.error = f"could not inspect the worker: {detail}"
        return report
    if r.exit_code != 0:
        report.error = report.data.get("error") or f"exit {r.exit_code}: {r.stderr.strip()[-200:]}"
        return report
    report.state = report.data.get("state", "ok")
    return report


def _chips(settings: Settings, fleet: Fleet, action: str, timeout: float, **options: Any) -> list[WorkerReport]:
    command = remote.chips_command(action, settings.device_globs, **options)
    return [report(r) for r in fleet.run(command, timeout=timeout)]


def check(settings: Settings, fleet: Fleet) -> list[WorkerReport]:
    return _chips(settings, fleet, "check", CHIPS_TIMEOUT_S)


def kill(
    settings: Settings, fleet: Fleet, *, grace: float = KILL_GRACE_S, dry_run: bool = False, all_python: bool = False
) -> list[WorkerReport]:
    """tpuctl's tmux sessions, then what holds the chips (and, with all_python, every Python process of the SSH user:
    tpu_command.sh's `pkill -f python`), TERM then KILL after `grace`; then the lockfiles nobody holds."""
    options = {"grace": grace, "dry_run": dry_run, **({"all_python": True} if all_python else {})}
    return _chips(settings, fleet, "kill", CHIPS_TIMEOUT_S + grace, **options)


def clean_logs(settings: Settings, fleet: Fleet, *, dry_run: bool = False) -> list[WorkerReport]:
    return _chips(settings, fleet, "clean", CHIPS_TIMEOUT_S, dry_run=dry_run)


def prepare_command(settings: Settings) -> str:
    """What `prepare` runs on every worker (and `--dry-run` shows); a ConfigError when there is no jax pin."""
    if not settings.jax_version:
        raise ConfigError(
            "jax_version is not set, and jax is not installed here to take the version from",
            f"{how_to_set('jax_version')}, or install the train extra here: pip install -e '.[train]'",
        )
    return remote.prepare_command(
        settings.remote_dir,
        settings.python,
        settings.extras,
        settings.pip_args,
        settings.device_globs,
        jax_version=settings.jax_version,
        apt_packages=settings.apt_packages,
    )


def prepare(settings: Settings, fleet: Fleet) -> list[WorkerReport]:
    return [report(r) for r in fleet.run(prepare_command(settings))]


def check_exit_code(reports: list[WorkerReport]) -> int:
    """0 all free, 1 any busy, 3 any unknown (an unknown worker might be busy: it outranks busy)."""
    states = {r.state for r in reports}
    return EXIT_UNKNOWN if "unknown" in states else EXIT_FAILED if "busy" in states else EXIT_OK
