"""Commands on the workers' shells: `ssh` (one worker, the system client) and `exec` (every worker in parallel)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

import click

from tpuctl import render
from tpuctl.cli.common import (
    err,
    fleet_of,
    line_printer,
    parse_workers,
    reach,
    say_failures,
    settings_from,
    show_table,
)
from tpuctl.cli.options import (
    all_option,
    dry_run_option,
    fleet_options,
    json_option,
    worker_option,
    workers_option,
)
from tpuctl.errors import EXIT_UNREACHABLE, TpuctlError

if TYPE_CHECKING:
    from tpuctl.fleet import WorkerResult


@click.command(context_settings={"ignore_unknown_options": True})
@worker_option
@fleet_options()
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(worker: int, command: tuple[str, ...], **flags: Any) -> None:
    """Open a shell on one worker, or run CMD there (system ssh client).

    \b
    Examples:
      tpuctl ssh --worker 3
      tpuctl ssh -- 'tail -n 50 /tmp/tpu_logs/*.INFO'
    """
    from tpuctl import remote
    from tpuctl.ssh import KnownHosts, host_key_name, ssh_command

    settings, node = reach(settings_from(flags))
    index = parse_workers(str(worker), len(node.workers))[0]
    host = node.workers[index].address(settings.internal_addresses)
    if shutil.which("ssh") is None:
        raise TpuctlError("ssh is not installed on this machine", "install openssh-client")
    if settings.replace_host_keys:
        KnownHosts(settings.path("known_hosts")).forget([host_key_name(host, settings.ssh_port)])
    argv = ssh_command(settings, host, interactive=not command)
    if command:
        argv.append(remote.user_command(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@workers_option("all")
@click.option("--group", is_flag=True, help="Print each worker's output together, after it finishes.")
@fleet_options("command_timeout")
@dry_run_option
@all_option
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    workers: str, group: bool, dry_run: bool, show_all: bool, as_json: bool, command: tuple[str, ...], **flags: Any
) -> None:
    """Run CMD on the workers in parallel; output prefixed [wN]; exit status is the worst worker's.

    One argument is a shell command line (quote it: pipes, $VARS work); several are words sent exactly as given.

    \b
    Examples:
      tpuctl exec -- 'python3 -c "import jax; print(jax.device_count())"'
      tpuctl exec --workers 0,3 -- ls -la /tmp/tpu_logs
    """
    from tpuctl import remote

    settings = settings_from(flags)
    fleet = fleet_of(settings, workers, authorize=not dry_run)
    if dry_run:
        err().print(f"Would run on {render.count(len(fleet.hosts), 'worker')} ({', '.join(fleet.hosts)}):")
        click.echo(remote.user_command(command))
        return
    quiet = as_json or group
    results = fleet.run(remote.user_command(command), on_line=None if quiet else line_printer())
    if as_json:
        render.print_json({"workers": [render.result_json(r) for r in results]})
    elif group:
        for r in results:
            err().print(render.plain(f"── {render.worker_name(r.worker.index)} {r.host}: {r.status}"), style="bold")
            sys.stdout.write(r.stdout)
            sys.stderr.write(r.stderr)
            sys.stdout.flush()
    if not as_json:
        show_table(results, render.results_table, lambda r: r.status, show_all, console=err())
        say_failures((r.worker.index, r.host, r.error) for r in results)
    raise SystemExit(exec_exit_code(results))


def exec_exit_code(results: list[WorkerResult]) -> int:
    """The worst worker's: 255 if any could not be reached or timed out, else the highest exit code."""
    if any(r.error is not None for r in results):
        return EXIT_UNREACHABLE
    return max((r.exit_code or 0 for r in results), default=0)
