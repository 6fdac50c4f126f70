"""Imports that keep tpuctl's start fast: a library imported with an optional dependency of it hidden, when tpuctl
never uses what that dependency serves (the library then takes its own "not installed" path)."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_without(module: str, *hidden: str) -> ModuleType:
    """`module`, imported the first time with `hidden` made unimportable (unless something imported them already)."""
    if module in sys.modules:
        return sys.modules[module]
    masked = [name for name in hidden if name not in sys.modules]
    for name in masked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(module)
    finally:
        for name in masked:
            del sys.modules[name]


def import_past_init(package: str, submodule: str) -> ModuleType:
    """`package.submodule`, without running `package`'s own __init__ when that is not imported yet: a generated
    client's __init__ may import every service it has (google-cloud-compute's: ~100 of them, a second of a command
    that needs one). A bare package with the real search path stands in while the submodule is imported; then it
    leaves sys.modules, so a later full import of the package still runs its __init__."""
    import importlib.util

    name = f"{package}.{submodule}"
    if package in sys.modules or name in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return importlib.import_module(name)  # not a package here: the import says what is wrong
    bare = ModuleType(package)
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules[package] = bare
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get(package) is bare:
            del sys.modules[package]


def load_tpu_v2() -> ModuleType:
    """google.cloud.tpu_v2 without aiohttp (installed where gcsfs is): api_core's optional asyncio REST transport
    imports it, ~0.2 s of every command that asks the API, and tpuctl never uses asyncio."""
    return import_without("google.cloud.tpu_v2", "aiohttp")


def load_paramiko() -> ModuleType:
    """paramiko, without the `invoke` it would pull in: paramiko.config imports invoke only to run `Match exec` lines
    of ssh_config files, which tpuctl never parses with paramiko (~60 ms of every fleet command's start)."""
    return import_without("paramiko", "invoke")
