"""`doctor`: what is missing before the TPU works for you (credentials, API, permissions, TPU, key, workers, tools,
chips), one line each with its fix."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from tpuctl import render
from tpuctl.cli.common import err, out, settings_from
from tpuctl.cli.options import fleet_options, json_option
from tpuctl.errors import EXIT_FAILED, EXIT_OK


@click.command()
@fleet_options("remote_dir")
@json_option
def doctor(as_json: bool, **flags: Any) -> None:
    """Check each step a fleet command takes, in order; every finding passes or says how to fix it. Changes nothing.
    Exit 0 only when every check passes.

    \b
    Examples:
      tpuctl doctor --tpu my-pod
      tpuctl doctor --json | jq '.checks[] | select(.result != "pass")'
    """
    from tpuctl.doctor import Doctor

    settings = settings_from(flags)
    doctor = Doctor(settings)
    console = err()
    with console.status("Checking ...") if console.is_terminal and not as_json else contextlib.nullcontext():
        findings = doctor.run()
    if as_json:
        render.print_json({"ok": doctor.ok, "checks": [f.to_json() for f in findings]})
    else:
        out().print(render.doctor_table(findings))
        failed = [f for f in findings if f.result == "fail"]
        if failed:
            console.print(render.plain(f"{render.count(len(failed), 'check')} failed; first fix: {failed[0].fix}"))
        else:
            console.print("All checks passed.")
    raise SystemExit(EXIT_OK if doctor.ok else EXIT_FAILED)
