"""What every command module of the CLI shares: resolved settings, the TPU's workers, the two consoles, failure
lines, the typed-name confirmation and sync's progress view. Imports nothing of tpuctl.cli's command modules."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import click

from tpuctl import config, render
from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from tpuctl.cloud import Node, Worker
    from tpuctl.config import Settings
    from tpuctl.fleet import Fleet
    from tpuctl.ops import WorkerReport


def settings_from(flags: dict[str, Any]) -> Settings:
    """The settings of this command: its flags over env, the root's --profile, gcloud and the defaults."""
    ctx = click.get_current_context()
    return config.resolve(flags, profile=ctx.find_root().obj["profile"])


def ready_node(settings: Settings) -> Node:
    """The --tpu node, READY and with its workers, else one line saying what it is instead."""
    from tpuctl import endpoints, slices

    settings.require("project", "zone", "tpu")
    assert settings.tpu is not None
    _, node = slices.get(settings, settings.tpu)
    if node.state != "READY":
        raise TpuctlError(f"TPU {node.name!r} is {node.state}, not READY", "see `tpuctl list` for its state")
    if not node.workers:
        raise TpuctlError(f"TPU {node.name!r} reports no workers yet", "wait until it is READY")
    endpoints.save(settings, node)
    return node


def reach(settings: Settings) -> tuple[Settings, Node]:
    """The --tpu node, READY, and the settings that log in to its workers: tpuctl's key authorised there for the
    user it logs in as (tpuctl.access), waited for with progress where it was added just now."""
    node = ready_node(settings)
    return authorized(settings, node), node


def authorized(settings: Settings, node: Node) -> Settings:
    from tpuctl import access, endpoints

    prepared = access.prepare(settings, node, say)
    if prepared.added:
        with KeyProgress(len(node.workers)) as shown:
            access.wait_accepted(prepared.settings, node.workers, shown)
    if prepared.how == "oslogin":  # the next commands on the recorded addresses log in as the same user
        endpoints.save(prepared.settings, node, login_user=prepared.settings.ssh_user)
    return prepared.settings


def connecting(settings: Settings) -> Settings:
    """The settings with the login user recorded for the --tpu node a moment ago (OS Login's POSIX name), where one
    was recorded and ssh_user was not set."""
    from tpuctl import endpoints

    user = endpoints.login_user(settings)
    if user and settings.sources.get("ssh_user", "default").startswith("default"):
        return dataclasses.replace(settings, ssh_user=user)
    return settings


def fleet_of(settings: Settings, workers: str = "all", recorded_ok: bool = True, authorize: bool = True) -> Fleet:
    """The chosen workers (--workers) of the --tpu node, ready to run commands on: at the addresses recorded a
    moment ago when each has a recorded host key to confirm it (tpuctl.endpoints), else as the API says, with
    tpuctl's key authorised there first (`authorize` False: a dry run, which connects nowhere).
    `recorded_ok=False`: as the API says (for what also reaches the workers outside the fleet, e.g. rsync).
    The fleet's `settings` are those to connect with (OS Login may name the user)."""
    from tpuctl import endpoints
    from tpuctl.fleet import Fleet

    settings.require("project", "zone", "tpu")
    recorded = recorded_workers(settings) if recorded_ok else None
    if recorded is not None:
        chosen = parse_workers(workers, len(recorded))

        def refresh() -> list[Worker]:
            endpoints.forget(settings)
            node = ready_node(settings)
            if len(node.workers) != len(recorded):
                raise TpuctlError(
                    f"TPU {node.name!r} has {len(node.workers)} workers now, not {len(recorded)}",
                    "run the command again",
                )
            if authorize:
                authorized(fleet.settings, node)
            return [node.workers[i] for i in chosen]

        if authorize:  # a key of ours to offer (a new one is authorised by refresh() once the workers refuse it)
            from tpuctl import access

            access.key_file(settings, say)
        fleet = Fleet(connecting(settings), [recorded[i] for i in chosen], refresh=refresh)
        return fleet
    node = ready_node(settings)
    if authorize:
        settings = authorized(settings, node)
    picked = [node.workers[i] for i in parse_workers(workers, len(node.workers))]
    return Fleet(settings, picked, accelerator_type=node.accelerator_type, source=node.source)


def recorded_workers(settings: Settings) -> list[Worker] | None:
    """The --tpu node's workers as recorded a moment ago (tpuctl.endpoints), when every one's address has a recorded
    host key that can confirm it; else None (ask the API)."""
    from tpuctl import endpoints
    from tpuctl.ssh import KnownHosts, host_key_name

    recorded = endpoints.load(settings)
    if recorded is None or settings.replace_host_keys:
        return None
    known = KnownHosts(settings.path("known_hosts"))
    hosts = [w.address(settings.internal_addresses) for w in recorded.workers]
    return list(recorded.workers) if all(known.knows(host_key_name(h, settings.ssh_port)) for h in hosts) else None


def parse_workers(spec: str, count: int) -> list[int]:
    """'all', '3', '0,3,5' or '0-3' -> worker indices, checked against the node's worker count."""
    if spec == "all":
        return list(range(count))
    indices: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            indices += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise TpuctlError(f"--workers {spec!r} is not a worker list", "use all, 3, 0,3,5 or 0-3") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise TpuctlError(f"worker {bad[0]} does not exist", f"this TPU has workers 0-{count - 1}")
    return sorted(set(indices))


def out() -> Any:
    """stdout's console: data (tables, command output, --json)."""
    return render.console()


def err() -> Any:
    """stderr's console: messages, progress and summaries."""
    return render.console(stderr=True)


def say(line: str) -> None:
    """One message line on stderr, never wrapped."""
    err().print(render.plain(line), soft_wrap=True)


def say_at(line: str) -> None:
    """A message line stamped with the time of day (babysit's log of what it does)."""
    say(f"{time.strftime('%H:%M:%S')} {line}")


def say_failures(items: Iterable[tuple[int, str, str | None]]) -> None:
    """The workers that failed and why, one line each, last on stderr so they are what the user sees."""
    for line in render.failures((i, host, why) for i, host, why in items if why):
        err().print(render.plain(line), style="red")


def line_printer(prefixed: bool = True) -> Callable[[Any, str, str], None]:
    """A fleet's on_line callback: each worker's lines to our stdout / stderr as they come, whole lines only (one
    lock for all workers), prefixed [wN] unless one worker's output is shown alone."""
    lock = threading.Lock()

    def show(worker: Any, stream: str, line: str) -> None:
        to = sys.stdout if stream == "stdout" else sys.stderr
        with lock:
            to.write(f"[{render.worker_name(worker.index)}] {line}\n" if prefixed else line + "\n")
            to.flush()

    return show


def show_reports(
    reports: list[WorkerReport],
    as_json: bool,
    table: Callable[[list[WorkerReport]], Any],
    show_all: bool = True,
    detail: str = "",
) -> None:
    """Per-worker reports as JSON, or as a table followed by the failed workers and why (last, on stderr). Unless
    `show_all`, a pod's worth of workers is summed up in a line (then `detail`) over a table of the odd ones."""
    if as_json:
        render.print_json([render.report_json(r) for r in reports])
        return
    show_table(reports, table, render.report_state, show_all, detail)
    say_failures((r.index, r.ip, r.error) for r in reports)


def show_table(
    items: list[Any],
    table: Callable[[list[Any]], Any],
    state_of: Callable[[Any], str],
    show_all: bool,
    detail: str = "",
    console: Any = None,
) -> None:
    """The table of `items` (on stdout, or `console`); past render.SUMMARIZE_AFTER of them (unless `show_all`), a
    summary line and the rows unlike the most."""
    console = console or out()
    shown, summary = render.summarize(items, state_of, show_all)
    if summary:
        console.print(render.plain(f"{summary}{f'; {detail}' if detail else ''}"))
    if shown:
        console.print(table(shown))


def confirm_by_name(name: str, action: str) -> None:
    """Ask the user to type the TPU's name before `action`; without a terminal, refuse (they pass --yes)."""
    if not sys.stdin.isatty():
        raise TpuctlError(f"refusing to {action} TPU {name!r} without confirmation", "add --yes (or use --dry-run)")
    import questionary

    typed = questionary.text(f"Type the TPU name to {action} it ({name}):").unsafe_ask()
    if typed.strip() != name:
        raise TpuctlError(f"confirmation {typed!r} does not match {name!r}; nothing was done")


def quoted(word: str) -> str:
    """A word as the user would type it back in a shell (a run name in a `Next:` hint)."""
    return shlex.quote(word)


class _Shown:
    """A rich progress view on stderr while a terminal shows it (rich is not even imported otherwise)."""

    progress: Any = None

    @staticmethod
    def on_terminal(enabled: bool, columns: Callable[[], tuple[Any, ...]]) -> Any:
        console = render.console(stderr=True) if enabled and sys.stderr.isatty() else None
        if console is None or not console.is_terminal:
            return None
        from rich.progress import Progress

        return Progress(*columns(), console=console, transient=True)

    def __enter__(self) -> Any:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def _sync_columns() -> tuple[Any, ...]:
    from rich.progress import BarColumn, TextColumn

    return (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[phase]}"))


def _key_columns() -> tuple[Any, ...]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("Waiting for the workers to accept the key"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


class SyncProgress(_Shown):
    """A row per worker and its sync phase."""

    def __init__(self, count: int, enabled: bool):
        self.progress = self.on_terminal(enabled, _sync_columns)
        self.tasks: dict[int, Any] = {}
        self.lock = threading.Lock()

    def __call__(self, worker: Any, phase: str) -> None:
        if self.progress is None:
            return
        with self.lock:
            if worker.index not in self.tasks:
                name = render.worker_name(worker.index)
                self.tasks[worker.index] = self.progress.add_task(name, total=1, phase=phase)
            done = phase in ("done", "failed")
            self.progress.update(self.tasks[worker.index], phase=phase, completed=1 if done else 0)


class KeyProgress(_Shown):
    """The wait for the workers to take up a key just added: how many accept it so far. A bar on a terminal; else a
    line whenever the count changes."""

    def __init__(self, count: int):
        self.shown = -1
        self.progress = self.on_terminal(True, _key_columns)
        if self.progress is not None:
            self.task = self.progress.add_task("key", total=count)

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
        elif done != self.shown and done != total:
            say(f"{done}/{total} workers accept the key so far; waiting for their guest agent")
        self.shown = done
        if done == total:
            say(f"All {render.count(total, 'worker')} accept the key")
