"""tpuctl: the command line. One thin function per command: parse, call the library, print.

The group and the list of commands are here; each family of commands is a module of this package (discovery, doctor,
shell, workspace, chips, runs, lifecycle) that builds on `common` (settings, workers, consoles, failure lines) and
`options` (the options several commands share). Command modules never import this module or each other.

Output: data on stdout (tables, command output, --json), messages and summaries on stderr.
Exit codes: tpuctl.errors.EXIT_CODES, the one list (shown by --help).
"""

from __future__ import annotations

from typing import Any

import click

from tpuctl import __version__
from tpuctl.cli import chips, discovery, doctor, lifecycle, runs, shell, workspace
from tpuctl.errors import EXIT_CODES, EXIT_FAILED, TpuctlError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# `tpuctl --help` ends with the exit codes ("\b": click keeps the lines as they are)
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {code:<3}  {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.option("--profile", envvar="TPUCTL_PROFILE", help="Profile of ~/.config/tpuctl/config.toml [env TPUCTL_PROFILE]")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="tpuctl")
@click.pass_context
def cli(ctx: click.Context, profile: str | None, verbose: bool) -> None:
    """Run CLIP training on Cloud TPU pods: create a TPU, check what is missing (doctor), sync, prepare, run a
    recipe on every worker and watch it (status, logs, stop), check and free the chips, clean logs; or `menu`.

    \b
    Examples:
      tpuctl doctor --zone us-central2-b --tpu my-pod
      tpuctl create my-pod --type v4-32 --spot
      tpuctl sync . --tpu my-pod && tpuctl prepare --tpu my-pod
      tpuctl run recipes/b16.toml --tpu my-pod --workdir gs://my-bucket/b16
      tpuctl status --tpu my-pod
      tpuctl check --tpu my-pod --json
    """
    ctx.ensure_object(dict).update(profile=profile, verbose=verbose)  # main() reads "verbose" back


COMMANDS = (
    discovery.config_group,
    discovery.list_nodes,
    shell.ssh,
    shell.exec_,
    workspace.sync,
    workspace.prepare,
    chips.check,
    chips.kill,
    chips.clean_logs,
    discovery.menu,
    doctor.doctor,
    runs.plan,
    runs.run,
    runs.status,
    runs.logs,
    runs.stop,
    runs.attach,
    runs.runs_,
    lifecycle.create,
    lifecycle.delete,
    lifecycle.describe,
    lifecycle.babysit,
)
for command in COMMANDS:
    cli.add_command(command)


def main() -> None:
    """Console entry point: user errors become one line and an exit code; tracebacks only with tpuctl's own -v (as
    click parsed it: a `-v` further on belongs to a command, e.g. `tpuctl exec -- grep -v x`)."""
    state: dict[str, Any] = {}
    try:
        cli.main(standalone_mode=False, prog_name="tpuctl", obj=state)
    except TpuctlError as e:
        if state.get("verbose"):
            raise
        click.echo(f"tpuctl: error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
    except click.exceptions.Abort:
        click.echo("tpuctl: aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        click.echo("tpuctl: interrupted", err=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as e:
        if state.get("verbose"):
            raise
        click.echo(f"tpuctl: internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)", err=True)
        raise SystemExit(EXIT_FAILED) from None
