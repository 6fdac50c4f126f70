"""The training-run commands: run, status, logs, stop, attach, runs. Thin like the rest of the CLI: they parse, call
tpuctl.launch / tpuctl.registry, and print.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tpuctl import render
from tpuctl.cli.common import (
    SyncProgress,
    err,
    fleet_of,
    line_printer,
    out,
    parse_workers,
    quoted,
    say,
    say_failures,
    settings_from,
    show_table,
)
from tpuctl.cli.options import (
    all_option,
    dry_run_option,
    fleet_options,
    grace_option,
    json_option,
    run_name_argument,
    run_spec_options,
    setting_options,
    worker_option,
    workers_option,
)
from tpuctl.defaults import STOP_GRACE_S
from tpuctl.errors import EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN, TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.launch import Target
    from tpuctl.ops import WorkerReport
    from tpuctl.registry import RunRecord

# `logs --follow` runs until Ctrl-C; this only bounds a forgotten one.
FOLLOW_TIMEOUT_S = 7 * 24 * 3600.0


@click.command()
@run_spec_options
@click.option("--no-sync", is_flag=True, help="Do not sync this directory to the workers first.")
@click.option(
    "--prepare", is_flag=True, help="Prepare the workers' environment after the sync (as `tpuctl prepare` does)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Kill whatever holds the chips first, start where a worker's code differs from what the sync sent, and"
    " where the plan says a stage does not fit the pod's chips, instead of refusing.",
)
@click.option("--follow", "-f", is_flag=True, help="Then print worker 0's log until the trainers end.")
@click.option("--local", is_flag=True, help="Train on this machine instead of a TPU (target 'local').")
@fleet_options("remote_dir", "command_timeout")
@setting_options("target", "workdir_root", "coordinator_port", "check_paths")
@dry_run_option
@json_option
def run(
    recipe: Path,
    name: str | None,
    workdir: str | None,
    overrides: tuple[str, ...],
    env_items: tuple[str, ...],
    no_sync: bool,
    prepare: bool,
    force: bool,
    follow: bool,
    local: bool,
    dry_run: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Start the trainer with RECIPE in tmux on every worker (or on this machine with --local).

    On a TPU, first plans the recipe for the pod's type (as `tpuctl plan`, where libtpu is installed here) and
    refuses a stage that cannot fit a chip's HBM. Syncs this directory (unless --no-sync), refuses if the chips are
    busy, wires the workers together for jax.distributed, and records the run so status/logs/stop/attach know it.
    --force starts past each refusal. Running the same name again resumes from its workdir's checkpoint.

    \b
    Examples:
      tpuctl run recipes/b16.toml --tpu my-pod --workdir gs://my-bucket/b16
      tpuctl run recipes/tiny.toml --local
      tpuctl run recipes/b16.toml --dry-run
    """
    from tpuctl import launch

    settings = settings_from(flags)
    project = Path.cwd()
    spec = launch.RunSpec.parse(project, recipe, name, workdir, overrides, env_items)
    local = local or settings.target == "local"
    accelerator_type = None
    if local:
        target = launch.local_target(settings, project)
    else:  # the API's addresses: the launch's rsync reaches the workers outside the fleet
        spec.check_bucket(settings)  # the local trainer checks its own paths in seconds
        fleet = fleet_of(settings, recorded_ok=False, authorize=not dry_run)
        settings = fleet.settings
        target = launch.pod_target(settings, fleet)
        accelerator_type = fleet.accelerator_type or settings.accelerator_type
    record = spec.record(settings, target.kind, target.cwd, target.hosts)
    if accelerator_type and not dry_run:  # after the checks that take no time, before anything reaches a worker
        from tpuctl import fit

        launch.require_shared_workdir(settings, record, len(target.hosts))
        fit.check(recipe, spec.overrides, accelerator_type, force, say)
    sync = not (local or no_sync)
    if dry_run:
        launch.require_shared_workdir(settings, record, len(target.hosts))
        _show_plan(settings, target, record, sync=sync, as_json=as_json)
        return
    try:
        with SyncProgress(len(target.hosts), enabled=sync and not as_json) as shown:
            record, reports = launch.launch(
                settings,
                target,
                record,
                project=project,
                sync=sync,
                prepare=prepare and not local,
                busy="kill" if force else "refuse",
                other_code="start" if force else "refuse",
                say=say,
                on_sync_progress=shown,
            )
    except launch.LaunchFailed as e:
        if e.busy is not None:
            out().print(render.check_table(e.busy))
        say_failures(e.failures)
        raise
    if as_json:
        render.print_json({"run": record.to_json(), "workers": [render.report_json(r) for r in reports]})
        return
    out().print(render.launch_table(reports))
    named = quoted(record.name)
    err().print(
        f"Started run {record.name!r} on {render.count(len(reports), 'worker')} (workdir {record.workdir}). "
        f"Next: tpuctl status {named} · tpuctl logs {named} -f · tpuctl stop {named}"
    )
    if follow:
        _print_logs(settings, target.subset([0]), record, lines=1000, follow=True, prefixed=False)
        final = launch.status(settings, target, record)
        out().print(render.status_table(final))
        raise SystemExit(status_exit_code(final))


def resume_command(record: RunRecord) -> str:
    """The `tpuctl run` that continues `record` (same name, hence workdir; same overrides and environment)."""
    import shlex

    words = ["tpuctl", "run", record.recipe, "--name", record.name]
    words += ["--local"] if record.target == "local" else ["--tpu", record.tpu or ""]
    for item in record.overrides:
        words += ["--set", item]
    for key, value in record.env.items():
        words += ["--env", f"{key}={value}"]
    return shlex.join(words)


def _show_plan(settings: Settings, target: Target, record: RunRecord, sync: bool, as_json: bool) -> None:
    from tpuctl import launch

    plans = [launch.worker_plan(settings, target, record, w) for w in target.fleet.workers]
    if as_json:
        workers = [
            {"worker": w.index, "host": h, "command": launch.describe_plan(p), **p}
            for w, h, p in zip(target.fleet.workers, target.hosts, plans, strict=True)
        ]
        render.print_json({"run": record.to_json(), "sync": sync, "workers": workers})
        return
    steps = ["sync this directory to " + record.cwd] if sync else []
    steps += ["check the chips", f"start tmux session {plans[0]['session']} running"]
    err().print(render.plain(f"Would {', '.join(steps)}, on {render.count(len(plans), 'worker')}:"))
    for w, host, plan in zip(target.fleet.workers, target.hosts, plans, strict=True):
        click.echo(f"[{render.worker_name(w.index)} {host}] {launch.describe_plan(plan)}")


def _recorded_target(record: RunRecord, flags: dict[str, Any]) -> tuple[Settings, Target]:
    """The settings and target of a recorded run: its TPU unless flags name another, or this machine."""
    from tpuctl import launch

    if record.target == "local":
        settings = settings_from(flags)
        return settings, launch.local_target(settings, Path(record.cwd))
    for key in ("project", "zone", "tpu"):
        if flags.get(key) is None:
            flags[key] = getattr(record, key)
    if flags.get("remote_dir") is None:
        flags["remote_dir"] = record.cwd
    fleet = fleet_of(settings_from(flags))
    return fleet.settings, launch.pod_target(fleet.settings, fleet)


@click.command()
@run_name_argument
@fleet_options()
@all_option
@json_option
def status(run: str | None, show_all: bool, as_json: bool, **flags: Any) -> None:
    """Per worker: trainer running or how it ended, tmux session, last step/loss/img/s, last checkpoint.

    RUN defaults to the latest run started from this machine. Exit 0 all running or done, 1 any failed or dead,
    3 any worker unknown (unreachable).

    Example: tpuctl status b16 --json
    """
    from tpuctl import codetree, launch, registry

    record = registry.load(run)
    settings, target = _recorded_target(record, flags)
    reports = launch.status(settings, target, record)
    if as_json:
        workers = [render.report_json(r) | {"state": render.report_state(r)} for r in reports]
        render.print_json({"run": record.to_json(), "workers": workers})
    else:
        err().print(render.plain(f"run {record.name!r}: {record.recipe}, workdir {record.workdir}"))
        err().print(render.plain(f"code: {codetree.describe(record.code)}"))
        show_table(reports, render.status_table, render.report_state, show_all, render.steps_line(reports))
        say_failures((r.index, r.ip, r.error) for r in reports)
        for note in render.status_notes(reports):
            err().print(render.plain(note))
    raise SystemExit(status_exit_code(reports))


def status_exit_code(reports: list[WorkerReport]) -> int:
    if any(r.error for r in reports):
        return EXIT_UNKNOWN
    return EXIT_FAILED if any(r.state in ("failed", "dead", "absent") for r in reports) else EXIT_OK


@click.command()
@run_name_argument
@workers_option("0", "--worker", "-w", help="Whose log")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what the trainers write (Ctrl-C ends).")
@click.option("--lines", "-n", type=click.IntRange(min=0), default=50, show_default=True, help="Lines of history.")
@fleet_options()
def logs(run: str | None, workers: str, follow: bool, lines: int, **flags: Any) -> None:
    """Show (or --follow) the trainer's log of RUN on worker 0, or on several workers with [wN] prefixes.

    \b
    Examples:
      tpuctl logs -f
      tpuctl logs b16 --workers all -n 5
    """
    from tpuctl import registry

    record = registry.load(run)
    settings, target = _recorded_target(record, flags)
    chosen = parse_workers(workers, len(target.fleet.workers))
    ok = _print_logs(settings, target.subset(chosen), record, lines, follow, prefixed=len(chosen) > 1)
    raise SystemExit(EXIT_OK if ok else EXIT_FAILED)


def _print_logs(
    settings: Settings, target: Target, record: RunRecord, lines: int, follow: bool, prefixed: bool
) -> bool:
    """Print the workers' logs (following them until their trainers end); False if some log could not be read."""
    from tpuctl import launch, remote

    timeout = FOLLOW_TIMEOUT_S if follow else settings.command_timeout
    command = remote.tail_command(launch.run_dir(target, record), lines, follow)
    results = target.fleet.run(command, timeout=timeout, on_line=line_printer(prefixed))
    say_failures((r.worker.index, r.host, r.error or (r.stderr.strip() or None)) for r in results if not r.ok)
    return all(r.ok for r in results)


@click.command()
@run_name_argument
@grace_option(STOP_GRACE_S, "Seconds to checkpoint and exit.")
@fleet_options()
@all_option
@json_option
def stop(run: str | None, grace: float, show_all: bool, as_json: bool, **flags: Any) -> None:
    """SIGTERM the trainers of RUN so they checkpoint and exit; kill what is left after --grace seconds.

    `tpuctl run` with the same name afterwards resumes from the checkpoint.

    Example: tpuctl stop b16 --grace 300
    """
    from tpuctl import launch, registry

    record = registry.load(run)
    settings, target = _recorded_target(record, flags)
    reports = launch.stop(settings, target, record, grace)
    killed = [i for i, r in enumerate(reports) if r.state == "killed"]
    if killed and target.kind == "tpu":  # a trainer that outlived the grace: free its worker's chips as `kill` does
        from tpuctl import ops

        ops.kill(settings, target.subset(killed).fleet)
    if as_json:
        render.print_json({"run": record.to_json(), "workers": [render.report_json(r) for r in reports]})
    else:
        show_table(reports, render.stop_table, render.report_state, show_all)
        say_failures((r.index, r.ip, r.error) for r in reports)
        say_failures(
            (r.index, r.ip, f"the trainer exited {r.data.get('exit_code')} on SIGTERM (see `tpuctl logs`)")
            for r in reports
            if r.state == "failed"
        )
        if not any(r.error for r in reports):
            (first,) = launch.status(settings, target.subset([0]), record)  # the checkpoint it will resume from
            saved = first.data.get("checkpoint") or "none yet"
            if all(r.state == "not running" for r in reports) and first.state == "done":
                err().print(
                    render.plain(
                        f"Run {record.name!r} had finished (every stage trained): nothing to stop or resume."
                        f" Its checkpoints and metrics: {record.workdir}"
                    )
                )
            else:
                err().print(render.plain(f"Stopped at checkpoint {saved}. Resume with: {resume_command(record)}"))
    failed = any(r.error or r.state in ("killed", "failed") for r in reports)
    raise SystemExit(EXIT_FAILED if failed else EXIT_OK)


@click.command()
@run_name_argument
@worker_option
@fleet_options()
def attach(run: str | None, worker: int, **flags: Any) -> None:
    """Attach to RUN's tmux session on one worker (detach with Ctrl-b d; the run goes on)."""
    from tpuctl import registry, remote

    record = registry.load(run)
    settings, target = _recorded_target(record, flags)
    index = parse_workers(str(worker), len(target.fleet.workers))[0]
    # inside a local tmux already, switch this client to the run's session (tmux refuses to nest an attach)
    nested = target.kind == "local" and bool(os.environ.get("TMUX"))
    command = remote.attach_command(remote.session_name(record.slug), switch=nested)
    if not sys.stdin.isatty():
        raise TpuctlError("attach needs a terminal", "use `tpuctl logs --follow` from scripts")
    if target.kind == "local":
        argv = ["bash", "-c", command]
    else:
        from tpuctl.ssh import ssh_command

        argv = [*ssh_command(settings, target.hosts[index], interactive=True), command]
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@click.command("runs")
@json_option
def runs_(as_json: bool) -> None:
    """The runs started from this machine, latest first."""
    from tpuctl import registry

    records = registry.all_runs()
    if as_json:
        render.print_json([r.to_json() for r in records])
    elif not records:
        err().print("No runs yet. Start one with: tpuctl run RECIPE")
    else:
        out().print(render.runs_table(records))


@click.command("plan")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--hbm-gib", type=float, help="Plan against this much HBM per chip (default: the chip's).")
@click.option("--largest-batch", is_flag=True, help="Also search each stage's largest batch that fits (slower).")
@setting_options("accelerator_type")
@json_option
def plan(
    recipe: Path,
    overrides: tuple[str, ...],
    hbm_gib: float | None,
    largest_batch: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Compile every stage of RECIPE for a TPU type here (libtpu, no TPU) and show what each chip must hold.

    The real TPU compiler's memory per chip (parameters and optimizer state, temporaries) against the chip's HBM,
    whether each stage fits (and what it needs where it does not), and the step's FLOPs per chip. Needs the trainer and
    libtpu on this machine: pip install -e '.[train,tpu]'. Exit 1 when a stage does not fit.

    \b
    Examples:
      tpuctl plan recipes/b16.toml --type v4-256
      tpuctl plan recipes/so400m.toml --type v5p-256 --set mesh.fsdp=8 --json
    """
    import importlib.util
    import subprocess

    from tpuctl import fit

    settings = settings_from(flags)
    if not settings.accelerator_type:
        raise TpuctlError("plan needs the pod's accelerator type", "--type v4-256 (or accelerator_type in the config)")
    if importlib.util.find_spec("jax") is None:
        raise TpuctlError(
            "plan compiles with the trainer, which is not installed here", "pip install -e '.[train,tpu]'"
        )
    args = fit.plan_args(recipe, settings.accelerator_type, overrides, hbm_gib, largest_batch)
    args += ["--json"] if as_json else []
    # its table and lines go straight to this terminal; JAX only ever runs in that child, never in tpuctl
    raise SystemExit(subprocess.run(args, check=False).returncode)
