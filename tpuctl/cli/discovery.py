"""Where things are: `config show` (every setting and its source), `list` (the zone's TPUs) and `menu` (pick a TPU,
then run the other commands from a menu)."""

from __future__ import annotations

from typing import Any

import click

from tpuctl import render
from tpuctl.cli.common import err, out, settings_from
from tpuctl.cli.options import fleet_options, json_option, setting_options


@click.group(name="config")
def config_group() -> None:
    """Show where tpuctl's settings come from."""


@config_group.command("show")
@fleet_options("remote_dir", "command_timeout")
@json_option
def config_show(as_json: bool, **flags: Any) -> None:
    """Print every resolved setting and where it came from (flag, env, profile, gcloud, default).

    Example: TPUCTL_ZONE=us-central2-b tpuctl config show
    """
    settings = settings_from(flags)
    if as_json:
        render.print_json(render.settings_json(settings))
    else:
        out().print(render.settings_table(settings))


@click.command("list")
@setting_options("project", "zone", "internal_ip")
@json_option
def list_nodes(as_json: bool, **flags: Any) -> None:
    """List the TPUs in the zone: state, health, type, workers and their IPs.

    Example: tpuctl list --project my-proj --zone us-central2-b --json
    """
    from tpuctl.cloud import TpuApi

    settings = settings_from(flags)
    nodes = TpuApi(settings).list_nodes()
    if as_json:
        render.print_json([n.to_json() for n in nodes])
    elif not nodes:
        err().print(f"No TPUs in project {settings.project}, zone {settings.zone}.")
    else:
        out().print(render.nodes_table(nodes, settings.internal_ip))


@click.command()
@click.pass_context
def menu(ctx: click.Context) -> None:
    """Interactive menu (replaces tpu_command.sh): pick the TPU, then list, ssh, sync, prepare, check, kill, clean
    logs, run, status, logs and stop until you exit. Needs a terminal; scripts use the subcommands."""
    from tpuctl import menu as menus

    menus.loop(ctx.find_root().obj["profile"])
