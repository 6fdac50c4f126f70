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
@setting_options("project", "zone", "internal_ip", "backend")
@json_option
def list_nodes(as_json: bool, **flags: Any) -> None:
    """List the TPUs in the zone (the Cloud TPU API's and Compute Engine's): state, health, type, workers and their
    IPs, and where each is.

    Example: tpuctl list --project my-proj --zone us-central2-b --json
    """
    from tpuctl import slices

    settings = settings_from(flags)
    nodes, waiting, notes = slices.list_all(settings)
    for note in notes:  # a source that could not be read, while another could
        err().print(render.plain(note))
    if as_json:
        entries = [{**n.to_json(), "kind": "node"} for n in nodes]
        render.print_json(entries + [{**q.to_json(), "kind": "queued_resource"} for q in waiting])
        return
    if not nodes:
        err().print(f"No TPUs in project {settings.project}, zone {settings.zone}.")
    else:
        out().print(render.nodes_table(nodes, settings.internal_ip))
    if waiting:
        out().print(render.queued_table(waiting))


@click.command()
@click.pass_context
def menu(ctx: click.Context) -> None:
    """Interactive menu (replaces tpu_command.sh): pick the TPU, then list, ssh, sync, prepare, check, kill, clean
    logs, run, status, logs and stop until you exit. Needs a terminal; scripts use the subcommands."""
    from tpuctl import menu as menus

    menus.loop(ctx.find_root().obj["profile"])
