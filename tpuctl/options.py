"""Shared click options, derived from the Settings fields so that flags, env names and help never drift."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from tpuctl.config import env_name, setting_fields

# A list setting's flag takes one comma-separated string, as its env variable does.
_CLICK_TYPES: dict[str, Any] = {"str": str, "path": str, "int": int, "float": float, "list": str}
# Settings every fleet command takes; the others live in profiles/env (and a few get flags below).
FLEET_SETTINGS = ("project", "zone", "tpu", "ssh_user", "ssh_key", "ssh_port", "concurrency")
BOOL_FLAGS = {
    "internal_ip": "--internal-ip/--external-ip",
    "replace_host_keys": "--replace-host-keys/--keep-host-keys",
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


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout, for scripts.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing.")
