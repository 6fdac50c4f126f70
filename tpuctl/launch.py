"""Training runs on a target (a pod's workers, or this machine): start the trainer in tmux on every worker, read
their status, stop them. Each is one command from tpuctl.remote per worker, answered in JSON (scripts/runs.py).

`launch` is the one way a run starts, for `tpuctl run` and for babysit's rounds alike: sync, prepare, free the chips,
start, stop what started if any worker failed, record the run.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tpuctl import codetree, defaults, ops, registry, remote, render
from tpuctl.errors import TpuctlError
from tpuctl.ops import WorkerReport, report
from trainer import contract

if TYPE_CHECKING:
    from tpuctl.cloud import Worker
    from tpuctl.config import Settings
    from tpuctl.fleet import Fleet
    from tpuctl.local import LocalFleet
    from tpuctl.registry import RunRecord
    from tpuctl.sync import ProgressCallback

# Seconds a worker gets to start its tmux session (the script waits for the trainer's pid file).
START_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 30.0
BUCKET_PROBE_S = 30.0  # scripts/runs.py's limit on asking a gs:// workdir for its newest checkpoint
VENV_PYTHON = ".venv/bin/python"
# Forwarded from this machine's environment to every trainer when set, and never shown: their values travel on the
# SSH channel's stdin (not a command line), are not written to the run's log or the run registry, and --dry-run
# shows NAME=****. On the worker the pane's shell reads them from a file only the user can read, then deletes it.
SECRET_ENV = ("WANDB_API_KEY",)
MASK = "****"


@dataclass
class Target:
    """Where a run goes: the workers (or this machine), the project directory there and its Python."""

    kind: str  # "tpu" | "local"
    fleet: Fleet | LocalFleet
    cwd: str
    python: str

    @property
    def hosts(self) -> list[str]:
        return self.fleet.hosts

    def subset(self, positions: list[int]) -> Target:
        """The same target on some of its workers (positions in fleet.workers)."""
        if self.kind == "local":
            return self
        from tpuctl.fleet import Fleet

        fleet = Fleet(self.fleet.settings, [self.fleet.workers[i] for i in positions])
        return Target(self.kind, fleet, self.cwd, self.python)


def local_target(settings: Settings, project: Path) -> Target:
    from tpuctl.local import LocalFleet

    venv = project / VENV_PYTHON
    return Target("local", LocalFleet(settings), str(project), str(venv) if venv.exists() else sys.executable)


def pod_target(settings: Settings, fleet: Fleet) -> Target:
    return Target("tpu", fleet, settings.remote_dir, VENV_PYTHON)


def recipe_in_project(recipe: Path, project: Path) -> str:
    """RECIPE as a path relative to the project (what the workers have), checked to exist and to be inside it."""
    if not recipe.is_file():
        raise TpuctlError(f"recipe {str(recipe)!r} does not exist", "pass a TOML file, e.g. recipes/tiny.toml")
    try:
        return recipe.resolve().relative_to(project.resolve()).as_posix()
    except ValueError:
        raise TpuctlError(
            f"recipe {str(recipe)!r} is outside the project {str(project)!r}", "put it under the project's recipes/"
        ) from None


def validate_recipe(path: Path, overrides: list[str]) -> tuple[bytes, Any]:
    """The trainer's own recipe check (standard library only), here, before anything starts on any worker; returns
    the content it checked and the recipe it read."""
    from trainer.recipe import RecipeError, load

    try:
        content = path.read_bytes()
        recipe = load(path, overrides)
    except RecipeError as e:  # a --set's mistake is named by the --set, one in the file by the file
        raise TpuctlError(str(e) if str(e).startswith("--set ") else f"{path}: {e}") from None
    except OSError as e:
        raise TpuctlError(f"cannot read recipe {path}: {e.strerror}") from None
    found = placeholders(recipe)
    if found:
        key, value = found[0]
        more = f" (and {len(found) - 1} more: {', '.join(k for k, _ in found[1:4])})" if len(found) > 1 else ""
        raise TpuctlError(
            f"{path}: {key} = {value!r} is a placeholder{more}",
            f"put yours in the recipe, or --set {key}=gs://...",
        )
    if path.read_bytes() != content:
        raise TpuctlError(f"recipe {path} changed while it was being checked", "run the command again")
    return content, recipe


PLACEHOLDER = re.compile(r"YOUR[-_][A-Z]+")  # the shipped recipes' gs://YOUR-BUCKET/..., YOUR-POD


def placeholders(value: Any, key: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in a loaded recipe that still holds a placeholder."""
    if isinstance(value, str):
        return [(key, value)] if PLACEHOLDER.search(value) else []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return [p for name, v in fields for p in placeholders(v, f"{key}.{name}" if key else name)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in placeholders(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in placeholders(v, f"{key}.{i}")]
    return []


def parse_env(items: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise TpuctlError(f"--env {item!r} is not NAME=VALUE", "e.g. --env XLA_FLAGS=--xla_dump_to=/tmp/dump")
        if key in SECRET_ENV:  # a flag's value is recorded with the run and shown: a secret must not be
            raise TpuctlError(
                f"--env {key}=... would record the secret with the run and show it",
                f"export {key} here instead: tpuctl forwards it to every worker without showing or storing it",
            )
        env[key] = value
    return env


@dataclass(frozen=True)
class RunSpec:
    """A run as the user describes it (what `run` and `babysit` share), checked here before anything starts."""

    recipe: str  # relative to the project, as the workers see it
    name: str
    workdir: str | None = None  # --workdir, else the recipe's; None: the run's earlier one, else WORKDIR_ROOT/NAME
    overrides: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    recipe_sha256: str | None = None  # the content validated here: the workers must read these very bytes
    checked: Any = field(default=None, compare=False, repr=False)  # the Recipe read from those bytes

    @classmethod
    def parse(
        cls,
        project: Path,
        recipe: Path,
        name: str | None,
        workdir: str | None,
        overrides: tuple[str, ...],
        env_items: tuple[str, ...],
    ) -> RunSpec:
        path = recipe_in_project(recipe, project)
        content, checked = validate_recipe(project / path, list(overrides))
        digest = hashlib.sha256(content).hexdigest()
        workdir = workdir or checked.workdir or None  # --workdir, else the recipe's own
        return cls(path, name or Path(path).stem, workdir, tuple(overrides), parse_env(env_items), digest, checked)

    def check_bucket(self, settings: Settings) -> None:
        """A pod run's gs:// paths (the recipe's, the workdir's bucket), read from this machine before anything
        starts; a TpuctlError naming every one that cannot be (tpuctl.bucket)."""
        from tpuctl import bucket

        workdir = registry.workdir_for(self.name, self.workdir, settings.workdir_root)
        bucket.check(settings, self.checked, workdir)

    def record(self, settings: Settings, kind: str, cwd: str, hosts: list[str] | None = None) -> RunRecord:
        """The run's record on a target of `kind` ("tpu" | "local") whose project is at `cwd`, on `hosts` when they
        are known (`launch` records the hosts it started on)."""
        local = kind == "local"
        workdir = registry.workdir_for(self.name, self.workdir, settings.workdir_root)
        if local and "://" not in workdir:
            workdir = os.path.abspath(os.path.expanduser(workdir))
        return registry.RunRecord(
            name=self.name,
            recipe=self.recipe,
            workdir=workdir,
            target=kind,
            cwd=cwd,
            workers=list(hosts or []),
            project=None if local else settings.project,
            zone=None if local else settings.zone,
            tpu=None if local else settings.tpu,
            overrides=list(self.overrides),
            env=dict(self.env),
            recipe_sha256=self.recipe_sha256,
        )


def shared(settings: Settings, workdir: str) -> bool:
    """Whether every worker sees `workdir` as one place: a bucket (any URL), or a path under shared_dirs."""
    if "://" in workdir:
        return True
    path = workdir.rstrip("/")
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in settings.shared_dirs if d)


def require_shared_workdir(settings: Settings, record: RunRecord, workers: int) -> None:
    """A run on several workers checkpoints into one workdir they all see, or not at all: a workdir on each worker's
    own disk would keep a checkpoint no other worker can read, lost with the VM (a preempted TPU is deleted)."""
    if workers <= 1 or shared(settings, record.workdir):
        return
    raise TpuctlError(
        f"run {record.name!r}: its workdir {record.workdir} is on each of the {workers} workers' own disk, where"
        " checkpoints would be lost with the VMs",
        f"pass --workdir gs://BUCKET/runs/{record.slug}, set workdir_root = 'gs://BUCKET/runs' once, or declare a"
        " mount every worker shares: shared_dirs = ['/mnt/shared']",
    )


def coordinator(settings: Settings, target: Target) -> str | None:
    """Worker 0's address as the other workers reach it (its internal IP), when there are other workers."""
    workers = target.fleet.workers
    return f"{workers[0].internal_ip}:{settings.coordinator_port}" if len(workers) > 1 else None


def worker_plan(settings: Settings, target: Target, record: RunRecord, worker: Worker) -> dict[str, Any]:
    """What worker `worker` runs: the trainer's words and environment, in which directory and tmux session."""
    count = len(target.fleet.workers)
    return {
        "name": record.name,
        "session": remote.session_name(record.slug),
        "run_dir": run_dir(target, record),
        "cwd": record.cwd,
        "argv": remote.trainer_argv(target.python, record.recipe, record.workdir, record.overrides),
        "env": remote.trainer_env(record.env, coordinator(settings, target), count, worker.index, record.code),
        "secret_env": sorted(secret_env()),  # names only: start() sends the values on stdin
        "device_globs": list(settings.device_globs),
        "tpu_vm_drops": tpu_vm_drops(target),
    }


def tpu_vm_drops(target: Target) -> list[str]:
    """What a worker with TPU device files leaves out of the trainer's environment: on a Cloud TPU node, the explicit
    jax.distributed wiring (JAX finds the other workers in the VM's metadata itself); on Compute Engine's VMs
    nothing, since Google's pages do not promise that metadata there and the wiring tpuctl gives (in the VMs'
    agent-worker-number order) holds either way."""
    return [] if target.fleet.source == "compute" else list(contract.DISTRIBUTED_ENV)


def secret_env() -> dict[str, str]:
    """The SECRET_ENV variables set here, read at launch (never stored with the run, so each start reads them anew)."""
    return {name: os.environ[name] for name in SECRET_ENV if os.environ.get(name)}


def run_dir(target: Target, record: RunRecord) -> str:
    path = remote.run_dir(record.slug)
    return os.path.expanduser(path) if target.kind == "local" else path


def describe_plan(plan: dict[str, Any]) -> str:
    """The command line a worker's tmux session runs (what --dry-run prints), secrets masked."""
    shown = plan["env"] | dict.fromkeys(plan["secret_env"], MASK)
    env = [f"{k}={v}" for k, v in sorted(shown.items())]
    line = f"cd {remote.shell_path(plan['cwd'])} && {shlex.join(['env', *env, *plan['argv']])}"
    dropped = [name for name in plan["tpu_vm_drops"] if name in plan["env"]]
    if dropped:
        line += f"\n  (a worker with TPU chips leaves out {', '.join(dropped)}: JAX finds the other workers itself)"
    return line


def start(settings: Settings, target: Target, record: RunRecord) -> list[WorkerReport]:
    """Start the run on every worker; the secrets (SECRET_ENV) go on stdin, the same to each."""
    secrets = secret_env()

    def command(worker: Worker) -> str:
        plan = worker_plan(settings, target, record, worker) | {"secret_env": sorted(secrets)}
        return remote.run_command("start", settings.python, **plan)

    stdin = json.dumps(secrets).encode() if secrets else None
    return [report(r) for r in target.fleet.run(command, timeout=START_TIMEOUT_S, stdin=stdin)]


def status(settings: Settings, target: Target, record: RunRecord) -> list[WorkerReport]:
    """Each worker's view of the run; the newest checkpoint of a bucket workdir is asked once, by the first worker
    (through the trainer's venv: tpuctl itself reads no bucket)."""
    first = target.fleet.workers[0].index

    def command(worker: Worker) -> str:
        return remote.run_command(
            "status",
            settings.python,
            session=remote.session_name(record.slug),
            run_dir=run_dir(target, record),
            workdir=record.workdir,
            probe=worker.index == first,
            trainer_python=target.python,
            cwd=record.cwd,
        )

    reports = [report(r) for r in target.fleet.run(command, timeout=STATUS_TIMEOUT_S + BUCKET_PROBE_S)]
    if "://" in record.workdir:  # one bucket: every worker's row shows what the first one read
        for r in reports[1:]:
            r.data["checkpoint"] = r.data.get("checkpoint") or reports[0].data.get("checkpoint")
    return reports


def stop(settings: Settings, target: Target, record: RunRecord, grace: float) -> list[WorkerReport]:
    """SIGTERM every worker's trainer at once (so they agree on a step to checkpoint), kill what outlives `grace`."""
    command = remote.run_command(
        "stop", settings.python, session=remote.session_name(record.slug), run_dir=run_dir(target, record), grace=grace
    )
    return [report(r) for r in target.fleet.run(command, timeout=grace + STATUS_TIMEOUT_S)]


def has_local_chips(settings: Settings) -> bool:
    """Whether this machine has TPU device files at all (else there is nothing for a local run to wait for)."""
    return any(glob.glob(g) for g in settings.device_globs)


class LaunchFailed(TpuctlError):
    """A run was not started: the step that failed and its workers' (index, host, why). Nothing it began is left
    running; `busy` holds the chip check when the step was `chips`."""

    def __init__(
        self, message: str, failures: list[tuple[int, str, str | None]], hint: str | None = None, busy: Any = None
    ):
        super().__init__(message, hint)
        self.failures, self.busy = failures, busy


def _failed_on(step: str, failures: list[tuple[int, str, str | None]], name: str) -> LaunchFailed:
    more = f" and {len(failures) - 1} more workers" if len(failures) > 1 else ""
    return LaunchFailed(
        f"{step} failed on {render.failures([failures[0]])[0]}{more}; run {name!r} was not started", failures
    )


Busy = Literal["refuse", "kill"]


def launch(
    settings: Settings,
    target: Target,
    record: RunRecord,
    *,
    project: Path | None = None,
    sync: bool = False,
    prepare: bool = False,
    replace_earlier: bool = False,
    busy: Busy = "refuse",
    other_code: Literal["refuse", "start"] = "refuse",
    say: Callable[[str], None] = lambda line: None,
    on_sync_progress: ProgressCallback | None = None,
) -> tuple[RunRecord, list[WorkerReport]]:
    """Start `record` on every worker of `target`, or raise LaunchFailed with nothing left running.

    In order: `sync` the local `project` to the workers, `prepare` their venvs, check that every worker holds the
    tree the last sync of `project` sent, by content, and that its recipe is the one checked here (`other_code`:
    refuse, or start and record which workers differ), stop this run's own earlier trainers (`replace_earlier`: a
    babysit round after a crash), free the chips (`busy`: refuse when someone holds them, or kill the holder), start
    the trainers (if any worker fails, stop the ones that started: a half-started pod would wait for the missing
    workers until its heartbeat times out), then record the run with its code's identity. Returns the record (with
    the workers' hosts) and each worker's start report.
    """
    require_shared_workdir(settings, record, len(target.fleet.workers))
    manifest = None
    if sync and project is not None:
        from tpuctl import sync as syncing

        with syncing.Mirror(settings, project) as mirror:
            synced = mirror.sync(target.fleet.workers, on_progress=on_sync_progress)
        failures = [(r.worker.index, r.host, r.error) for r in synced if not r.ok]
        if failures:
            raise _failed_on("sync", failures, record.name)
        manifest = mirror.manifest
    if prepare:
        say(f"Preparing {render.count(len(target.fleet.workers), 'worker')} (REMOTE_DIR/.venv, jax pinned) ...")
        failures = [(r.index, r.ip, r.error) for r in ops.prepare(settings, target.fleet) if r.error]
        if failures:
            raise _failed_on("prepare", failures, record.name)
    if project is not None:
        code = checked_code(settings, target, record, project, manifest, other_code, say)
        record = dataclasses.replace(record, code=code)
    if replace_earlier:
        stop(settings, target, record, grace=defaults.REPLACED_RUN_GRACE_S)
    _free_chips(settings, target, busy, say)
    record = dataclasses.replace(record, workers=target.hosts)
    reports = start(settings, target, record)
    failures = [(r.index, r.ip, r.error) for r in reports if r.error]
    if failures:
        # only the trainers this launch started: a worker that refused (e.g. this run is already training there)
        # keeps what it has
        started = [i for i, r in enumerate(reports) if not r.error]
        if started:
            stop(settings, target.subset(started), record, grace=defaults.ABORTED_LAUNCH_GRACE_S)
        raise _failed_on("start", failures, record.name)
    registry.save(record)
    return record, reports


CODE_CHECK_TIMEOUT_S = 300.0  # each worker reads its synced tree once


def checked_code(
    settings: Settings,
    target: Target,
    record: RunRecord,
    project: Path,
    manifest: codetree.Manifest | None,
    other_code: Literal["refuse", "start"],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The code's identity for the run's record, once the workers are known to hold it.

    A local run trains `project` itself. On a pod, the tree the last sync of `project` sent (`manifest`, else read
    from the mirror) must hold the recipe exactly as it was checked here, and every worker must hold that tree; a
    worker that does not refuses the launch, or with other_code="start" is named in the record. Without any sync of
    `project` from this machine (the code got there another way) the tree is unknown and said so.
    """
    from tpuctl import sync as syncing

    if target.kind == "local":
        try:
            tree: str | None = syncing.source_manifest(settings, project).tree_hash
        except TpuctlError as e:  # no rsync here: a local run needs none, so it trains with its tree unrecorded
            say(f"the code's tree is not recorded: {e}")
            tree = None
        return codetree.CodeIdentity.of(tree, project).to_json()
    manifest = manifest or syncing.last_manifest(settings, project)
    if manifest is None:
        say(f"{project} was never synced to {settings.remote_dir} from this machine: the code's tree is not recorded")
        return codetree.CodeIdentity.of(None, project).to_json()
    sent = manifest.files.get(record.recipe)
    if sent is None:
        raise LaunchFailed(
            f"the recipe {record.recipe} is not among the files sync sends; run {record.name!r} was not started",
            [],
            "a .gitignore rule or an exclude (sync_excludes, --exclude) keeps it out: move it or change that rule",
        )
    if record.recipe_sha256 is not None and sent != record.recipe_sha256:
        raise LaunchFailed(
            f"the recipe {record.recipe} the workers hold is not the one checked here; run {record.name!r} was not"
            " started",
            [],
            "sync it first (run without --no-sync)",
        )
    checks = codetree.check_workers(target.fleet, settings.remote_dir, manifest, CODE_CHECK_TIMEOUT_S)
    unknown: list[tuple[int, str, str | None]] = [(c.index, c.host, c.error) for c in checks if c.error]
    if unknown:
        raise _failed_on("code check", unknown, record.name)
    differ = [c for c in checks if c.differ]
    identity = codetree.CodeIdentity.of(manifest.tree_hash, project).to_json()
    if not differ:
        return identity
    failures: list[tuple[int, str, str | None]] = [(c.index, c.host, codetree.first_difference(c)) for c in differ]
    if other_code == "refuse":
        error = _failed_on("code check", failures, record.name)
        error.hint = "`tpuctl sync --full` puts back what the last sync sent; --force starts anyway"
        raise error
    say(f"--force: starting although {len(differ)} workers hold other code ({render.failures([failures[0]])[0]})")
    return identity | {"workers_differ": {f"w{c.index}": c.differ[:20] for c in differ}}


def _free_chips(settings: Settings, target: Target, busy: Busy, say: Callable[[str], None]) -> None:
    """Chips someone holds (or that cannot be checked) refuse the launch, or, with busy="kill", their holder is
    killed first. A local target without TPU device files has nothing to share."""
    if target.kind == "local" and not has_local_chips(settings):
        return
    reports = ops.check(settings, target.fleet)
    taken = [r for r in reports if r.state != "free"]
    if not taken:
        return
    if busy == "refuse":
        first = taken[0]
        raise LaunchFailed(
            f"the chips of w{first.index} ({first.ip}) are {first.state}",
            [],
            "stop that job (tpuctl stop / tpuctl kill) or pass --force to kill it first",
            busy=reports,
        )
    say(f"killing what holds the chips on {len(taken)} of {len(reports)} workers")
    ops.kill(settings, target.subset([i for i, r in enumerate(reports) if r.state != "free"]).fleet)  # those alone
