"""The TPU lifecycle commands: create, delete, describe, babysit. Thin like the rest of the CLI: they parse, call
tpuctl.lifecycle / tpuctl.cloud / tpuctl.babysit, and print.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tpuctl import defaults, render
from tpuctl.cli.common import confirm_by_name, err, out, say_at, settings_from
from tpuctl.cli.options import (
    dry_run_option,
    fleet_options,
    json_option,
    new_tpu_options,
    run_spec_options,
    setting_options,
    yes_option,
)
from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings

DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> int:
    """'90s', '30m', '6h', '2d' -> seconds."""
    match = DURATION.match(text.strip())
    if not match:
        raise TpuctlError(f"{option} {text!r} is not a duration", "write it like 90s, 30m, 6h or 2d")
    return round(float(match[1]) * SECONDS[match[2]])


class Progress:
    """Each lifecycle line printed to stderr as it happens (a log, so it survives a pipe), with a spinner below it
    on a terminal."""

    def __init__(self) -> None:
        self.console = err()
        self.status = self.console.status("") if self.console.is_terminal else None

    def __enter__(self) -> Progress:
        if self.status:
            self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.status:
            self.status.__exit__(*exc)

    def __call__(self, line: str) -> None:
        self.console.print(render.plain(line), soft_wrap=True)  # one line each, however long
        if self.status:
            self.status.update(render.plain(f"{line} ..."))


@click.command()
@click.argument("name")
@click.option("--spot", is_flag=True, help="Spot capacity: cheaper, may be taken back at any time.")
@click.option("--reservation", "reserved", is_flag=True, help="Use the project's reserved capacity.")
@click.option("--queued", is_flag=True, help="Through a queued resource: wait in line for capacity.")
@click.option("--valid-until", metavar="DURATION", help="With --queued: give up waiting after this (6h, 2d).")
@click.option(
    "--cancel-on-timeout",
    is_flag=True,
    help="With --queued: delete the request if it is still waiting at --ready-timeout (it stays queued otherwise).",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the TPU is READY.")
@click.option(
    "--attempts",
    default=defaults.CREATE_ATTEMPTS,
    show_default=True,
    help="Tries while the API has no capacity or quota.",
)
@click.option(
    "--backoff",
    default=defaults.CREATE_BACKOFF_S,
    show_default=True,
    help=f"Seconds before the second try; then x2, to {defaults.CREATE_BACKOFF_MAX_S / 60:.0f} min.",
)
@click.option(
    "--ready-timeout", default=defaults.READY_TIMEOUT_S, show_default=True, help="Seconds to wait for READY per try."
)
@setting_options("project", "zone", "ssh_user", "ssh_key", "backend")  # whose key the new VMs accept
@new_tpu_options
@dry_run_option
@json_option
def create(
    name: str,
    spot: bool,
    reserved: bool,
    queued: bool,
    valid_until: str | None,
    cancel_on_timeout: bool,
    wait: bool,
    attempts: int,
    backoff: float,
    ready_timeout: float,
    dry_run: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Create the TPU NAME (a node, or a queued resource with --queued) and wait until it is READY.

    No capacity or quota is retried with jittered exponential backoff (--attempts); with --zones, each attempt tries
    the zones in order and the TPU goes to the first that has room. Any other refusal (a bad --type, a name in use)
    is one line.

    \b
    Examples:
      tpuctl create my-pod --type v4-32 --spot
      tpuctl create my-pod --type v4-32 --spot --zones us-central2-b,us-central1-a
      tpuctl create my-pod --type v5litepod-16 --queued --valid-until 6h
      tpuctl create my-pod --type v4-32 --dry-run
    """
    from tpuctl import cloud, keys, lifecycle, slices

    settings = settings_from(flags)
    settings.require("project")
    zones = cloud.creation_zones(settings)
    if valid_until and not queued:
        raise TpuctlError("--valid-until is for queued resources", "add --queued, or drop --valid-until")
    if cancel_on_timeout and not queued:
        raise TpuctlError("--cancel-on-timeout is for queued resources", "add --queued, or drop it")
    if spot and reserved:
        raise TpuctlError("--spot and --reservation exclude each other", "pick one")
    if attempts < 1 or backoff < 0:
        raise TpuctlError("--attempts must be at least 1 and --backoff not negative")
    valid_until_s = parse_duration(valid_until, "--valid-until") if valid_until else None
    capacity = {"spot": spot, "reserved": reserved, "queued": queued, "valid_until_s": valid_until_s}
    ssh_key = keys.for_new_node(settings, make=not dry_run)  # the new VMs accept tpuctl from their first boot
    request = cloud.NodeRequest.from_settings(settings, name, ssh_key, **capacity)
    parent = f"projects/{settings.project}/locations/{zones[0]}"
    api = slices.for_create(settings)
    if dry_run and api.source == "compute":  # what Compute Engine would be sent: template, policy, group
        render.print_json(api.plan_json(request)) if as_json else out().print(render.plain(api.describe_plan(request)))
        return
    if dry_run:
        sent = cloud.request_json(request, parent)
        if as_json:
            render.print_json(sent)
        else:
            out().print(render.plain(f"{sent['method']} {settings.api_endpoint}{sent['path']}"))
            render.print_json(sent["body"])
        return
    with Progress() as say:
        node = lifecycle.create(
            api,
            request,
            zones=zones,
            wait=wait,
            attempts=attempts,
            backoff=lifecycle.Backoff(initial=backoff),
            timeout=ready_timeout,
            poll=settings.api_poll,
            say=say,
            cancel_on_timeout=cancel_on_timeout,
        )
    if node is None:  # --no-wait: there is no node to show yet
        return
    if node.zone != settings.zone:
        err().print(render.plain(f"TPU {name!r} is in zone {node.zone}: give the other commands --zone {node.zone}"))
    _show_node(api.in_zone(node.zone), node, as_json)


@click.command()
@click.argument("name", required=False)
@yes_option
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it is gone.")
@setting_options("project", "zone", "tpu", "backend")
@dry_run_option
def delete(name: str | None, yes: bool, wait: bool, dry_run: bool, **flags: Any) -> None:
    """Delete the TPU NAME or --tpu (with the queued resource that made it, if any). Asks you to type the name
    unless --yes.

    Example: tpuctl delete my-pod --yes
    """
    from tpuctl import endpoints, lifecycle, slices

    settings = settings_from(flags)
    name = name or _tpu_name(settings)
    api, node = slices.find(settings, name)
    waiting = api.get_queued(name) if node is None else None
    if node is None and waiting is not None:  # a request still in line, or one that failed: no node to delete
        _delete_queued(api, waiting, yes, wait, dry_run, settings.api_poll)
        return
    if node is None:  # one line naming the TPUs there
        api, node = slices.get(settings, name)
    what = f"TPU {name!r} ({node.accelerator_type}, {node.state})"
    if node.queued_resource:
        what += f" and its queued resource {node.queued_resource!r}"
    if dry_run:
        out().print(render.plain(f"would delete {what}"))
        return
    if not yes:
        confirm_by_name(name, "delete")
    with Progress() as say:
        lifecycle.delete(api, node, wait=wait, poll=settings.api_poll, say=say)
    endpoints.forget(dataclasses.replace(settings, tpu=name))  # its workers' recorded addresses mean nothing now


@click.command()
@click.argument("name", required=False)
@setting_options("project", "zone", "tpu", "backend")
@json_option
def describe(name: str | None, as_json: bool, **flags: Any) -> None:
    """One TPU in full: state, health and why, accelerator, runtime, spot/queued, workers (NAME or --tpu).

    Example: tpuctl describe my-pod --json
    """
    from tpuctl import slices

    settings = settings_from(flags)
    name = name or _tpu_name(settings)
    api, node = slices.find(settings, name)
    waiting = api.get_queued(name) if node is None else None
    if node is None and waiting is not None:  # a request with no node yet (or a failed one): the request itself
        if as_json:
            render.print_json({**waiting.to_json(), "kind": "queued_resource"})
        else:
            out().print(render.queued_describe_table(waiting))
            err().print(render.plain(f"it has no node yet; `tpuctl delete {name}` cancels the request"))
        return
    if node is None:
        api, node = slices.get(settings, name)
    _show_node(api, node, as_json)


def _delete_queued(api: Any, waiting: Any, yes: bool, wait: bool, dry_run: bool, poll: float) -> None:
    """Cancel a queued resource that has no node (waiting, failed or suspended)."""
    from tpuctl import lifecycle

    what = f"queued resource {waiting.name!r} ({waiting.accelerator_type}, {waiting.state}, no node)"
    if dry_run:
        out().print(render.plain(f"would delete {what}"))
        return
    if not yes:
        confirm_by_name(waiting.name, "delete")
    with Progress() as say:
        lifecycle.delete_queued(api, waiting.name, wait=wait, poll=poll, say=say)


def _tpu_name(settings: Settings) -> str:
    settings.require("tpu")
    assert settings.tpu is not None
    return settings.tpu


def _show_node(api: Any, node: Any, as_json: bool) -> None:
    queued_state = api.queued_state(node.queued_resource) if node.queued_resource else ""
    if as_json:
        render.print_json({**node.to_json(), "queued_resource_state": queued_state or None})
    else:
        out().print(render.describe_table(node, queued_state))


@click.command()
@run_spec_options
@click.option("--spot", is_flag=True, help="When babysit creates the TPU: spot capacity.")
@click.option(
    "--max-restarts", default=defaults.BABYSIT_MAX_RESTARTS, show_default=True, help="Rounds after the first, at most."
)
@click.option("--recreate", is_flag=True, help="May delete and remake a dead TPU it did not create itself.")
@click.option(
    "--poll", default=defaults.BABYSIT_POLL_S, show_default=True, help="Seconds between looks at the TPU and the run."
)
@click.option(
    "--backoff",
    default=defaults.BABYSIT_BACKOFF_S,
    show_default=True,
    help=f"Seconds before the first restart; then x2, to {defaults.BABYSIT_BACKOFF_MAX_S / 60:.0f} min.",
)
@click.option(
    "--unhealthy-grace", default=defaults.UNHEALTHY_GRACE_S, show_default=True, help="Seconds a TPU may stay unhealthy."
)
@fleet_options("remote_dir", "command_timeout")
@new_tpu_options
@setting_options("workdir_root", "coordinator_port", "check_paths")
@setting_options("python", "extras", "pip_args", "jax_version", "apt_packages")
@json_option
def babysit(
    recipe: Path,
    name: str | None,
    workdir: str | None,
    overrides: tuple[str, ...],
    env_items: tuple[str, ...],
    spot: bool,
    max_restarts: int,
    recreate: bool,
    poll: float,
    backoff: float,
    unhealthy_grace: float,
    as_json: bool,
    **flags: Any,
) -> None:
    """Keep the run of RECIPE on TPU --tpu alive until every stage is trained.

    Creates the TPU if it is missing (--type; in the first of --zones with room), deletes and recreates it when it
    is PREEMPTED, TERMINATED or unhealthy (only one babysit created, unless --recreate), syncs, prepares and starts
    the run, which resumes from its workdir's checkpoint; then watches the TPU and the run, and after a preemption, a
    lost worker or a crash starts another round after a jittered exponential backoff. Ends when the trainer reports
    every stage done (exit 0) or after --max-restarts (exit 4), printing the timeline. Its state file lets a
    restarted babysit carry on.

    \b
    Examples:
      tpuctl babysit recipes/b16.toml --tpu my-pod --type v4-64 --spot --workdir /mnt/bucket/b16
      tpuctl babysit recipes/b16.toml --tpu my-pod --recreate
    """
    from tpuctl import babysit as babysitting
    from tpuctl import cloud, keys, launch, ops, slices

    settings = settings_from(flags)
    settings.require("project", "tpu")
    cloud.creation_zones(settings)  # bad --zones: one line now
    assert settings.tpu is not None
    ops.prepare_command(settings)  # no jax pin: one line now, not in a round after a TPU was made
    project = Path.cwd()
    spec = launch.RunSpec.parse(project, recipe, name, workdir, overrides, env_items)
    spec.check_bucket(settings)  # before a TPU is made or waited for
    record = spec.record(settings, "tpu", settings.remote_dir)
    request = None
    if settings.accelerator_type:  # else babysit can only remake a TPU like the one there
        request = cloud.NodeRequest.from_settings(settings, settings.tpu, keys.for_new_node(settings), spot=spot)
    options = babysitting.Options(
        max_restarts=max_restarts,
        recreate=recreate,
        poll=poll,
        unhealthy_grace=unhealthy_grace,
        backoff=babysitting.babysit_backoff(backoff),
    )
    sitter = babysitting.Babysitter(settings, slices.for_create(settings), project, record, request, options, say_at)
    try:
        state = sitter.run()
    finally:
        _show_timeline(sitter.state, as_json)
    assert state.finished


def _show_timeline(state: Any, as_json: bool) -> None:
    from tpuctl import babysit as babysitting

    if as_json:
        render.print_json(babysitting.to_json(state))
        return
    title = f"run {state.run!r} on TPU {state.tpu!r}: {state.restarts} restarts"
    out().print(render.table(title, ["when", "what", "detail"], babysitting.timeline(state)))
