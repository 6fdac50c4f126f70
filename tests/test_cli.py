"""The CLI's shape: a group in tpuctl/cli/__init__.py that registers every command explicitly, command modules that
build on `common` and `options` only (no import circle, no command module reaching into another), options that
several commands share declared once."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import click

import tpuctl.cli
from tpuctl.cli import COMMANDS, cli

PACKAGE = Path(tpuctl.cli.__file__).parent
SHARED = {"tpuctl.cli.common", "tpuctl.cli.options"}
COMMAND_MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "common", "options"))


def cli_imports(path: Path) -> set[str]:
    """The tpuctl.cli modules (or names of the package itself) a module imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tpuctl.cli"):
            names = [node.module] if node.module != "tpuctl.cli" else [f"tpuctl.cli.{a.name}" for a in node.names]
            found |= set(names)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tpuctl.cli")}
    return found


def test_command_modules_build_on_the_shared_modules_only():
    assert COMMAND_MODULES == ["chips", "discovery", "doctor", "lifecycle", "runs", "shell", "workspace"]
    for name in COMMAND_MODULES:
        assert cli_imports(PACKAGE / f"{name}.py") <= SHARED, name
    for name in ("common", "options"):
        assert cli_imports(PACKAGE / f"{name}.py") == set(), name


def test_every_command_is_registered_once_and_explicitly():
    defined = []
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"tpuctl.cli.{name}")
        defined += [v for v in vars(module).values() if isinstance(v, click.Command)]
    defined = [c for c in defined if not any(c in g.commands.values() for g in defined if isinstance(g, click.Group))]
    assert sorted(c.name for c in defined) == sorted(c.name for c in COMMANDS)
    assert all(any(c is d for d in defined) for c in COMMANDS)
    assert cli.commands == {c.name: c for c in COMMANDS}


def test_run_and_babysit_describe_a_run_with_the_same_options():
    def described(command: click.Command) -> list[tuple]:
        wanted = ("recipe", "name", "workdir", "overrides", "env_items")
        return [(p.name, tuple(p.opts), getattr(p, "help", None)) for p in command.params if p.name in wanted]

    run, babysit = cli.commands["run"], cli.commands["babysit"]
    assert described(run) == described(babysit) and len(described(run)) == 5


def test_the_summary_names_the_first_day_commands_and_every_fleet_command_takes_ssh_proxy():
    from click.testing import CliRunner

    summary = CliRunner().invoke(cli, ["--help"]).output
    assert all(f"tpuctl {name} " in summary for name in ("doctor", "create", "sync", "prepare", "run", "status"))
    for name in ("exec", "check", "sync", "run", "doctor", "ssh"):  # the docs name --ssh-proxy: it exists
        assert "--ssh-proxy" in CliRunner().invoke(cli, [name, "--help"]).output, name
