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
