"""The TPU chips on the workers: `check` who holds them, `kill` the job that does, `clean-logs` after it."""

from __future__ import annotations

from typing import Any

import click

from tpuctl import render
from tpuctl.cli.common import confirm_by_name, err, fleet_of, settings_from, show_reports
from tpuctl.cli.options import all_option, dry_run_option, fleet_options, grace_option, json_option, yes_option
from tpuctl.defaults import KILL_GRACE_S
from tpuctl.errors import EXIT_FAILED, EXIT_OK


@click.command()
@fleet_options()
@all_option
@json_option
def check(show_all: bool, as_json: bool, **flags: Any) -> None:
    """Who holds the TPU chips on each worker. Exit 0 all free, 1 any busy, 3 any unknown (unreachable).

    Example: tpuctl check --tpu my-pod --json
    """
    from tpuctl import ops

    settings = settings_from(flags)
    reports = ops.check(settings, fleet_of(settings))
    if as_json:  # the documented shape: worker, ip, state, holders (and error)
        render.print_json([render.check_json(r) for r in reports])
    else:
        show_reports(reports, False, render.check_table, show_all)
    raise SystemExit(ops.check_exit_code(reports))


@click.command()
@grace_option(KILL_GRACE_S, "Seconds between TERM and KILL.")
@click.option(
    "--all-python",
    is_flag=True,
    help="Also every Python process of the SSH user on each worker (tpu_command.sh's `pkill -f python`).",
)
@yes_option
@fleet_options()
@dry_run_option
@json_option
def kill(grace: float, all_python: bool, yes: bool, dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Stop the training job on every worker: tpuctl's tmux sessions, then the chip holders, then stale locks.

    Holders get TERM, then KILL after --grace seconds; lockfiles go only once nobody holds them. With --all-python,
    every Python process the SSH user runs on the workers goes too, whether it holds the chips or not.
    Never kills its own shell or sshd.

    \b
    Examples:
      tpuctl kill --tpu my-pod --dry-run
      tpuctl kill --tpu my-pod --all-python --yes
    """
    from tpuctl import ops

    fleet = fleet_of(settings_from(flags))
    settings = fleet.settings  # the user it logs in as (OS Login's name) is whose processes --all-python means
    if not dry_run and not yes:
        what = f"every Python process of {settings.ssh_user}" if all_python else "the jobs"
        confirm_by_name(settings.tpu or "", f"kill {what} on all {len(fleet.workers)} workers of")
    reports = ops.kill(settings, fleet, grace=grace, dry_run=dry_run, all_python=all_python)
    show_reports(reports, as_json, render.kill_table)
    if not as_json and not dry_run and not any(r.error for r in reports):
        err().print("Stopped. Next: tpuctl check")
    failed = any(r.error or r.data.get("survivors") for r in reports)
    raise SystemExit(EXIT_FAILED if failed else EXIT_OK)


@click.command("clean-logs")
@fleet_options()
@dry_run_option
@json_option
def clean_logs(dry_run: bool, as_json: bool, **flags: Any) -> None:
    """Remove /tmp/tpu_logs, core dumps, /var/crash's reports and libtpu lockfiles nobody holds; freed bytes per worker.

    Example: tpuctl clean-logs --tpu my-pod
    """
    from tpuctl import ops

    settings = settings_from(flags)
    reports = ops.clean_logs(settings, fleet_of(settings), dry_run=dry_run)
    show_reports(reports, as_json, render.clean_table)
    raise SystemExit(EXIT_FAILED if any(r.error for r in reports) else EXIT_OK)
