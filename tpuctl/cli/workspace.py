"""The project on the workers: `sync` (this directory, incrementally) and `prepare` (its venv, jax pinned)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from tpuctl import render
from tpuctl.cli.common import (
    SyncProgress,
    connecting,
    err,
    fleet_of,
    out,
    reach,
    ready_node,
    recorded_workers,
    say_failures,
    settings_from,
    show_reports,
)
from tpuctl.cli.options import dry_run_option, fleet_options, json_option, setting_options
from tpuctl.errors import EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN

if TYPE_CHECKING:
    from tpuctl.config import Settings


@click.command()
@click.argument("directory", default=".", type=click.Path(path_type=Path))
@click.option("--delete", is_flag=True, help="Remove files on the workers that DIR no longer has.")
@click.option("--exclude", multiple=True, metavar="PAT", help="Also skip files matching PAT (rsync pattern).")
@click.option("--full", is_flag=True, help="rsync every worker in full instead of applying the computed delta.")
@click.option(
    "--verify",
    is_flag=True,
    help="Send nothing: compare every worker's tree with what the last sync sent, by content, and list what differs.",
)
@fleet_options("remote_dir", "command_timeout", "sync_excludes")
@dry_run_option
@json_option
def sync(
    directory: Path,
    delete: bool,
    exclude: tuple[str, ...],
    full: bool,
    verify: bool,
    dry_run: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Copy DIR (default .) to every worker's remote dir, incrementally, skipping .git, .gitignore'd files and
    SYNC_EXCLUDES (__pycache__, *.pyc and logs/ unless set otherwise).

    \b
    Examples:
      tpuctl sync . --tpu my-pod
      tpuctl sync ~/code/openvision --remote-dir '~/openvision' --exclude '*.ckpt'
      tpuctl sync . --sync-excludes ''    # send __pycache__, *.pyc and logs/ too
      tpuctl sync --verify                # does every worker hold exactly what was sent? (exit 1 if not)
    """
    from tpuctl import codetree
    from tpuctl import sync as syncing

    settings = settings_from(flags)
    src = directory.resolve()
    syncing.check_source(src)
    if verify:
        _verify(settings, src, exclude, as_json)
    if dry_run:
        files = syncing.changed_files(src, settings, delete=delete, excludes=exclude)
        hosts = [w.address(settings.internal_addresses) for w in ready_node(settings).workers]
        if as_json:
            render.print_json({"files": files, "workers": hosts})
        else:
            for f in files:
                click.echo(f)
            err().print(
                f"Would send {render.count(len(files), 'changed file')} to {render.count(len(hosts), 'worker')}"
                f" ({settings.remote_dir})."
            )
        return
    settings = connecting(settings)  # the user recorded for this TPU (OS Login's), for the early apply
    with syncing.Mirror(settings, src, delete=delete, excludes=exclude, full=full) as mirror:
        # The workers the last sync reached get the delta at once, where their host keys confirm them, while the
        # API is asked. When those are all the workers recorded a moment ago, the API has nothing to add; else it
        # says who the workers are (and tpuctl's key is authorised there first).
        recorded = recorded_workers(settings)
        hosts = [w.address(settings.internal_addresses) for w in recorded or []]
        confirmed = recorded is not None and mirror.applied_early(hosts)
        if confirmed and recorded is not None:
            workers = recorded
        else:
            mirror.settings, node = reach(settings)
            workers = list(node.workers)
        with SyncProgress(len(workers), enabled=not as_json) as shown:
            results = mirror.sync(workers, on_progress=shown)
    tree = mirror.manifest.tree_hash
    if as_json:
        render.print_json([render.sync_json(r, tree) for r in results])
    else:
        out().print(render.sync_table(results))
        say_failures((r.worker.index, r.host, r.error) for r in results)
        if all(r.ok for r in results):
            err().print(
                f"Synced {src} to {settings.remote_dir} on {render.count(len(results), 'worker')}"
                f" (tree {tree[: codetree.SHORT]}). Next: tpuctl prepare"
            )
    raise SystemExit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)


def _verify(settings: Settings, src: Path, exclude: tuple[str, ...], as_json: bool) -> NoReturn:
    """sync --verify: each worker's tree against the last sync's, by content. Exit 0 all the same, 1 any differs,
    3 any worker could not be asked."""
    from tpuctl import codetree
    from tpuctl import sync as syncing

    settings, node = reach(settings)
    expected, checks = syncing.verify(settings, src, node.workers, exclude)
    if as_json:
        render.print_json({"tree": expected.tree_hash, "workers": [render.tree_check_json(c) for c in checks]})
    else:
        out().print(render.tree_check_table(checks))
        say_failures(
            (c.index, c.host, c.error or (codetree.first_difference(c) if c.state == "differs" else None))
            for c in checks
        )
        if all(c.state == "same" for c in checks):
            err().print(
                f"Every one of {render.count(len(checks), 'worker')} holds the tree the last sync sent"
                f" ({expected.tree_hash[: codetree.SHORT]}, {render.count(len(expected.files), 'file')})."
            )
        elif any(c.state == "differs" for c in checks):
            err().print(f"`tpuctl sync {src} --full` puts back what the last sync sent (add --delete for the extras).")
    if any(c.error for c in checks):
        raise SystemExit(EXIT_UNKNOWN)
    raise SystemExit(EXIT_FAILED if any(c.state == "differs" for c in checks) else EXIT_OK)


@click.command()
@fleet_options("remote_dir", "command_timeout")
@setting_options("python", "extras", "pip_args", "jax_version", "apt_packages")
@dry_run_option
@json_option
def prepare(dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Create REMOTE_DIR/.venv on every worker with the project and its extras, jax pinned (idempotent).

    Every worker gets jax==JAX_VERSION (jax[tpu] where it has TPU devices), so a pod never mixes releases; the
    APT_PACKAGES (comma-separated) are installed first with apt-get, as root or through sudo -n.

    Example: tpuctl sync . && tpuctl prepare --jax-version 0.4.35 --apt-packages libgl1,ffmpeg
    """
    from tpuctl import ops

    settings = settings_from(flags)
    command = ops.prepare_command(settings)  # a missing pin is one line before any worker is asked
    fleet = fleet_of(settings, authorize=not dry_run)
    settings = fleet.settings
    if dry_run:
        plan = render.prepare_plan(settings.extras, settings.jax_version or "", settings.apt_packages)
        err().print(render.plain(f"Would install {plan}"))
        if click.get_current_context().find_root().obj["verbose"]:
            err().print(f"on {render.count(len(fleet.hosts), 'worker')} ({', '.join(fleet.hosts)}), by running:")
            click.echo(command)
        else:
            err().print(f"on {render.count(len(fleet.hosts), 'worker')} ({', '.join(fleet.hosts)}).")
            err().print("The script it runs there: tpuctl -v prepare --dry-run")
        return
    reports = ops.prepare(settings, fleet)
    show_reports(reports, as_json, render.prepare_table)
    if not as_json and not any(r.error for r in reports):
        err().print(
            f"{settings.remote_dir}/.venv is ready on {render.count(len(reports), 'worker')}. Next: tpuctl check"
        )
    raise SystemExit(EXIT_FAILED if any(r.error for r in reports) else EXIT_OK)
