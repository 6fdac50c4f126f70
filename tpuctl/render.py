"""Pure renderers: results -> rich tables (for people, on stderr or stdout) and JSON (for scripts, on stdout).

No command logic here; the commands decide what to show, these decide how it looks.
"""

from __future__ import annotations

import collections
import datetime
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tpuctl.cloud import Node, Queued
    from tpuctl.codetree import TreeCheck
    from tpuctl.config import Settings
    from tpuctl.doctor import Finding
    from tpuctl.fleet import WorkerResult
    from tpuctl.ops import WorkerReport
    from tpuctl.sync import SyncResult

T = TypeVar("T")


def console(stderr: bool = False) -> Console:
    """A console that drops colour and live displays when not on a terminal (and honours NO_COLOR)."""
    from rich.console import Console

    c = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not c.is_terminal:
        c.width = max(c.width, 200)  # a pipe or file: don't fold table cells at 80 columns
    return c


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*(plain(v) for v in row))
    return t


SUMMARIZE_AFTER = 16  # more workers than this: one summary line, and a table of only the odd ones


def summarize(items: Sequence[T], state_of: Callable[[T], str], show_all: bool) -> tuple[list[T], str | None]:
    """A pod's worth of rows, readable: past SUMMARIZE_AFTER workers (unless `show_all`), a line counting each state
    and only the rows unlike the most common state. Returns (rows to show, summary line or None)."""
    if show_all or len(items) <= SUMMARIZE_AFTER:
        return list(items), None
    states = collections.Counter(state_of(i) for i in items)
    usual = states.most_common(1)[0][0]
    odd = [i for i in items if state_of(i) != usual]
    line = f"{len(items)} workers: " + ", ".join(f"{n} {state}" for state, n in states.most_common())
    if odd:
        line += f"; the {count(len(odd), 'worker')} not {usual} below (--all: every worker)"
    return odd, line


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def status_style(status: str) -> Text:
    from rich.text import Text

    return Text(
        status,
        style={"ok": "green", "free": "green", "same": "green", "busy": "yellow", "failed": "red"}.get(status, "red"),
    )


def plain(value: Any) -> Text:
    """A cell or line shown as it is: text from workers (commands, errors) may hold [brackets] rich would parse."""
    from rich.text import Text

    return value if isinstance(value, Text) else Text("" if value is None else str(value))


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def worker_name(index: int) -> str:
    return f"w{index}"


def settings_table(settings: Settings) -> Table:
    from tpuctl.config import setting_fields

    rows = [(f.name, getattr(settings, f.name), settings.sources.get(f.name, "")) for f in setting_fields()]
    return table(None, ["setting", "value", "from"], rows)


def settings_json(settings: Settings) -> dict[str, Any]:
    from tpuctl.config import setting_fields

    return {
        f.name: {"value": getattr(settings, f.name), "source": settings.sources.get(f.name)} for f in setting_fields()
    }


def nodes_table(nodes: Sequence[Node], internal: bool) -> Table:
    rows = []
    for n in nodes:
        ips = [(w.internal_ip if internal else w.external_ip) or "-" for w in n.workers]
        shown = ", ".join(ips[:4]) + (f", … (+{len(ips) - 4})" if len(ips) > 4 else "")
        state = plain(n.state)
        state.stylize("green" if n.state == "READY" else "yellow")
        source = "Compute Engine" if n.source == "compute" else "Cloud TPU"
        rows.append((n.name, state, n.health or "-", n.accelerator_type, len(n.workers), shown, source))
    return table(None, ["name", "state", "health", "type", "workers", "ips", "source"], rows)


def since(iso: str, now: datetime.datetime | None = None) -> str:
    """How long ago an RFC 3339 time was: "3h 12m", "2d 4h", "40s" ("-" if there is none)."""
    if not iso:
        return "-"
    then = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    seconds = max(0, int(((now or datetime.datetime.now(datetime.timezone.utc)) - then).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else (f"{minutes}m" if minutes else f"{secs}s")


def queued_table(requests: Sequence[Queued]) -> Table:
    """Queued resources with no node yet (`tpuctl list`, below the TPUs)."""
    rows = []
    for q in requests:
        state = plain(q.state)
        state.stylize("red" if q.state in ("FAILED", "SUSPENDED") else "yellow")
        capacity = "spot" if q.spot else "on-demand"
        rows.append((q.name, state, q.accelerator_type, capacity, since(q.create_time), q.valid_until or "-"))
    return table(
        "queued resources with no node yet", ["name", "state", "type", "capacity", "queued for", "valid until"], rows
    )


def queued_describe_table(q: Queued) -> Table:
    """One queued resource with no node, a field per line (`tpuctl describe`)."""
    rows = [
        ("name", q.name),
        ("kind", "queued resource (no node yet)"),
        ("state", q.state),
        ("failure", q.failure or "-"),
        ("node it makes", q.node_id or "-"),
        ("accelerator", q.accelerator_type or "-"),
        ("capacity", "spot" if q.spot else "on-demand"),
        ("queued since", q.create_time or "-"),
        ("valid until", q.valid_until or "-"),
    ]
    return table(None, ["field", "value"], rows)


def describe_table(node: Node, queued_state: str) -> Table:
    """One TPU, a field per line (`tpuctl describe`)."""
    kind = "spot" if node.spot else ("reserved" if node.reserved else "on-demand")
    rows = [
        ("name", node.name),
        ("state", node.state),
        ("health", node.health or "-"),
        ("health description", node.health_description or "-"),
        ("accelerator", node.accelerator_type),
        ("source", "Compute Engine (a MIG of TPU VMs, or one TPU VM)" if node.source == "compute" else "Cloud TPU API"),
        ("runtime" if node.source == "tpu" else "image", node.runtime_version or "-"),
        ("capacity", kind),
        ("queued resource", f"{node.queued_resource} ({queued_state or 'gone'})" if node.queued_resource else "-"),
        ("created", node.create_time or "-"),
        ("network", node.network or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in node.labels) or "-"),
    ]
    rows += [(f"worker {w.index}", f"{w.internal_ip} (external {w.external_ip or 'none'})") for w in node.workers]
    return table(None, ["field", "value"], rows)


def results_table(results: Sequence[WorkerResult]) -> Table:
    rows = [
        (
            worker_name(r.worker.index),
            r.host,
            status_style(r.status),
            "-" if r.exit_code is None else r.exit_code,
            f"{r.seconds:.2f}s",
        )
        for r in results
    ]
    return table(None, ["worker", "host", "status", "exit", "time"], rows)


def result_json(r: WorkerResult) -> dict[str, Any]:
    return {
        "worker": r.worker.index,
        "ip": r.host,
        "status": r.status,
        "exit_code": r.exit_code,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "error": r.error,
        "seconds": round(r.seconds, 3),
    }


def sync_table(results: Sequence[SyncResult]) -> Table:
    rows = [
        (
            worker_name(r.worker.index),
            r.host,
            status_style("ok" if r.ok else "failed"),
            r.method or "-",
            r.files,
            human_bytes(r.bytes_sent),
            f"{r.seconds:.2f}s",
        )
        for r in results
    ]
    return table(None, ["worker", "host", "status", "method", "files", "sent", "time"], rows)


def report_json(r: WorkerReport) -> dict[str, Any]:
    return {"worker": r.index, "ip": r.ip, "error": r.error, **r.data}


def check_json(r: WorkerReport) -> dict[str, Any]:
    locks = [{"path": lock["path"], "held_by": lock["holders"]} for lock in r.data.get("lockfiles", [])]
    return {"worker": r.index, "ip": r.ip, "state": r.state, "holders": r.holders, "lockfiles": locks, "error": r.error}


def _lockfiles(r: WorkerReport) -> str:
    locks = r.data.get("lockfiles", [])
    return ", ".join(f"{lock['path']} ({'held' if lock['holders'] else 'stale'})" for lock in locks)


def _processes(processes: Iterable[dict[str, Any]], width: int = 60) -> str:
    return "; ".join(f"{p['pid']} {p['user']} {p['cmd'][:width]}" for p in processes)


def check_table(reports: Sequence[WorkerReport]) -> Table:
    rows = [
        (
            worker_name(r.index),
            r.ip,
            status_style(r.state),
            _processes(r.holders),
            _lockfiles(r),
        )
        for r in reports
    ]
    return table(None, ["worker", "host", "state", "holders (pid user cmd)", "lockfiles"], rows)


def kill_table(reports: Sequence[WorkerReport]) -> Table:
    dry_run = any(r.data.get("dry_run") for r in reports)
    rows = [
        (
            worker_name(r.index),
            r.ip,
            ", ".join(r.data.get("sessions", [])),
            _processes(r.data.get("killed", []), 50),
            ", ".join(r.data.get("lockfiles_removed", [])),
            ", ".join(map(str, r.data.get("survivors", []))),
        )
        for r in reports
    ]
    verb = "would kill" if dry_run else "killed"
    return table(None, ["worker", "host", "tmux sessions", verb, "lockfiles removed", "survivors"], rows)


def clean_table(reports: Sequence[WorkerReport]) -> Table:
    dry_run = any(r.data.get("dry_run") for r in reports)
    rows = [
        (
            worker_name(r.index),
            r.ip,
            len(r.data.get("removed", [])) + len(r.data.get("lockfiles_removed", [])),
            human_bytes(r.data.get("freed_bytes", 0)),
        )
        for r in reports
    ]
    return table(None, ["worker", "host", "removed", "would free" if dry_run else "freed"], rows)


def prepare_plan(extras: str, jax_version: str, apt_packages: Sequence[str]) -> str:
    """What `prepare` installs, in words (its --dry-run)."""
    project = f"the project[{extras}]" if extras else "the project"
    words = f"{project} with jax=={jax_version} (jax[tpu]=={jax_version} on hosts with TPU devices)"
    return f"apt packages {' '.join(apt_packages)}, then {words}" if apt_packages else words


def _apt_cell(apt: dict[str, Any] | None) -> str:
    if not apt:
        return ""
    return f"installed {len(apt['missing'])}" if apt["missing"] else "present"


def prepare_table(reports: Sequence[WorkerReport]) -> Table:
    rows = [
        (
            worker_name(r.index),
            r.ip,
            status_style("failed" if r.error else "ok"),
            "" if r.error else "installed" if r.data.get("changed") else "unchanged",
            r.data.get("jax") or "",
            _apt_cell(r.data.get("apt")),
            f"{r.data.get('seconds', 0):.1f}s",
        )
        for r in reports
    ]
    return table(None, ["worker", "host", "status", "venv", "jax", "apt", "time"], rows)


def sync_json(r: SyncResult, tree: str | None = None) -> dict[str, Any]:
    return {
        "worker": r.worker.index,
        "ip": r.host,
        "ok": r.ok,
        "method": r.method,
        "files": r.files,
        "bytes_sent": r.bytes_sent,
        "seconds": round(r.seconds, 3),
        "error": r.error,
        "tree": tree,
    }


def tree_check_table(checks: Sequence[TreeCheck]) -> Table:
    rows = [
        (
            worker_name(c.index),
            c.host,
            status_style(c.state),
            len(c.differ),
            len(c.extra),
            ", ".join([*c.differ, *c.extra][:3]) + (" …" if len(c.differ) + len(c.extra) > 3 else ""),
        )
        for c in checks
    ]
    return table(None, ["worker", "host", "tree", "differ", "extra", "paths"], rows)


def tree_check_json(c: TreeCheck) -> dict[str, Any]:
    return {"worker": c.index, "ip": c.host, "state": c.state, "differ": c.differ, "extra": c.extra, "error": c.error}


def failures(items: Iterable[tuple[int, str, str | None]]) -> list[str]:
    """Lines naming each failed worker and why, printed last so they are what the user sees."""
    return [f"{worker_name(i)} ({host}): {why}" for i, host, why in items]


RUN_STATE_STYLES = {
    "running": "green",
    "done": "green",
    "stopped": "green",
    "starting": "yellow",
    "exiting": "yellow",
    "ok": "green",
}


def run_state(state: str) -> Text:
    from rich.text import Text

    return Text(state, style=RUN_STATE_STYLES.get(state, "red"))


def launch_table(reports: Sequence[WorkerReport]) -> Table:
    rows = [
        (
            worker_name(r.index),
            r.ip,
            run_state("failed" if r.error else "started"),
            r.data.get("session", ""),
            r.data.get("pid") or "-",
            r.data.get("log", ""),
        )
        for r in reports
    ]
    return table(None, ["worker", "host", "status", "tmux session", "pid", "log"], rows)


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def report_state(r: WorkerReport) -> str:
    """A worker's state as the tables show it: "unknown" when it could not be asked."""
    return r.state if r.error is None else "unknown"


def steps_line(reports: Sequence[WorkerReport]) -> str:
    """Where the workers' training is, in one phrase: "pretrain steps 1200-1204" (or "" when none reported)."""
    progress = [r.data["progress"] for r in reports if r.error is None and r.data.get("progress")]
    if not progress:
        return ""
    stages = sorted({p["stage"] for p in progress})
    steps = [p["step"] for p in progress]
    span = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"
    return f"{'/'.join(stages)} step {span}"


def status_table(reports: Sequence[WorkerReport]) -> Table:
    rows = []
    for r in reports:
        progress = r.data.get("progress") or {}
        state = report_state(r)
        if state == "failed" and r.data.get("exit_code") is not None:
            state = f"failed (exit {r.data['exit_code']})"
        rows.append(
            (
                worker_name(r.index),
                r.ip,
                run_state(state),
                "alive" if r.data.get("session") else "-",
                f"{progress['stage']} {progress['step']}" if progress else "-",
                _number(progress.get("loss")),
                _number(progress.get("img_per_s"), 5),
                r.data.get("checkpoint") or "-",
                (r.error or r.data.get("last_line") or "")[:100],
            )
        )
    columns = ["worker", "host", "state", "tmux", "stage step", "loss", "img/s", "checkpoint", "last line"]
    return table(None, columns, rows)


def status_notes(reports: Sequence[WorkerReport]) -> list[str]:
    """What the status table cannot hold: the latest eval's error (it is global: the first worker that saw it) and
    why a bucket workdir's checkpoint could not be read."""
    notes = []
    failed_eval = next((r.data["eval_error"] for r in reports if r.data.get("eval_error")), None)
    if failed_eval:
        notes.append(f"latest eval failed: {failed_eval} (training goes on; see tpuctl logs)")
    unread = next((r.data["checkpoint_error"] for r in reports if r.data.get("checkpoint_error")), None)
    if unread:
        notes.append(f"checkpoint unknown: {unread}")
    return notes


def stop_table(reports: Sequence[WorkerReport]) -> Table:
    rows = [
        (
            worker_name(r.index),
            r.ip,
            run_state("unknown" if r.error else r.state),
            r.data.get("pid") or "-",
            "-" if r.data.get("exit_code") is None else r.data["exit_code"],
        )
        for r in reports
    ]
    return table(None, ["worker", "host", "trainer", "pid", "exit"], rows)


def runs_table(records: Sequence[Any]) -> Table:
    import time

    rows = [
        (
            r.name,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)),
            "this machine" if r.target == "local" else f"{r.tpu} ({len(r.workers)} workers)",
            r.recipe,
            r.workdir,
        )
        for r in records
    ]
    return table(None, ["run", "started", "where", "recipe", "workdir"], rows)


DOCTOR_MARKS = {"pass": "ok", "fail": "FAIL", "skipped": "-"}


def doctor_table(findings: Sequence[Finding]) -> Table:
    rows = [(f.check, DOCTOR_MARKS.get(f.result, f.result), f.detail, f.fix) for f in findings]
    return table(None, ("CHECK", "RESULT", "DETAIL", "FIX"), rows)
