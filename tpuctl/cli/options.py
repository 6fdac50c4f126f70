"""The click options more than one command takes, declared once. Setting flags derive from the Settings fields
(tpuctl/config.py) so that flags, env names and help never drift; other defaults come from tpuctl/defaults.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tpuctl.config import env_name, setting_fields

# A list setting's flag takes one comma-separated string, as its env variable does.
_CLICK_TYPES: dict[str, Any] = {"str": str, "path": str, "int": int, "float": float, "list": str}
# Settings every fleet command takes; the others live in profiles/env (and a few get flags below).
FLEET_SETTINGS = ("project", "zone", "tpu", "backend", "ssh_user", "ssh_key", "ssh_port", "ssh_proxy", "concurrency")
BOOL_FLAGS = {
    "internal_ip": "--internal-ip/--external-ip",
    "replace_host_keys": "--replace-host-keys/--keep-host-keys",
    "check_paths": "--check-paths/--no-check-paths",
}


def _option(name: str) -> Callable[[Any], Any]:
    f = next(f for f in setting_fields() if f.name == name)
    meta = f.metadata
    help_text = f"{meta['help']} [env {env_name(name)}]"
    if name in BOOL_FLAGS:
        return click.option(BOOL_FLAGS[name], name, default=None, help=help_text)
    flag = meta["flag"] or "--" + name.replace("_", "-")
    metavar = name.split("_")[-1].upper()
    return click.option(flag, name, type=_CLICK_TYPES[meta["kind"]], default=None, metavar=metavar, help=help_text)


def setting_options(*names: str) -> Callable[[Any], Any]:
    """Decorator adding one option per named setting; values reach the command as keyword arguments."""

    def decorate(fn: Any) -> Any:
        for name in reversed(names):
            fn = _option(name)(fn)
        return fn

    return decorate


def fleet_options(*extra: str) -> Callable[[Any], Any]:
    """The options of every command that acts on a TPU's workers."""
    return setting_options(*FLEET_SETTINGS, "internal_ip", "replace_host_keys", *extra)


# What describes a TPU to create: `create` and `babysit` (which creates one when it must) take the same.
NEW_TPU_SETTINGS = (
    "zones",
    "accelerator_type",
    "runtime_version",
    "image",
    "network",
    "subnetwork",
    "service_account",
    "scopes",
    "tags",
    "metadata",
    "startup_script",
    "data_disks",
)


def new_tpu_options(fn: Any) -> Any:
    return setting_options(*NEW_TPU_SETTINGS)(fn)


all_option = click.option(
    "--all", "show_all", is_flag=True, help="Every worker's row (past 16 workers: a summary and the odd ones)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout, for scripts.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
worker_option = click.option("--worker", "-w", type=int, default=0, show_default=True, help="Worker index.")
run_name_argument = click.argument("run", required=False)


def workers_option(default: str, *names: str, help: str = "Which workers") -> Callable[[Any], Any]:
    """--workers taking all, 3, 0,3,5 or 0-3."""
    return click.option(
        "--workers", *names, "workers", default=default, show_default=True, help=f"{help}: all, 3, 0,3,5 or 0-3."
    )


def grace_option(default: float, help: str) -> Callable[[Any], Any]:
    return click.option("--grace", type=float, default=default, show_default=True, help=help)


def run_spec_options(fn: Any) -> Any:
    """RECIPE and what `run` and `babysit` both take to describe a run: its name, workdir, overrides, environment.
    The command gets them as `recipe, name, workdir, overrides, env_items` (launch.RunSpec.parse reads them)."""
    for decorate in reversed(
        (
            click.argument("recipe", type=click.Path(path_type=Path)),
            click.option("--name", help="Run name (default: the recipe's file name); the same name again resumes it."),
            click.option(
                "--workdir",
                help="Checkpoints and metrics, a path every worker sees (default: WORKDIR_ROOT/NAME, or the run's "
                "earlier one).",
            ),
            click.option(
                "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable)."
            ),
            click.option(
                "--env", "env_items", multiple=True, metavar="NAME=VALUE", help="Trainer environment (repeatable)."
            ),
        )
    ):
        fn = decorate(fn)
    return fn
