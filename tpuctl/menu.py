"""`tpuctl menu`: the interactive menu that replaces OpenVision's tpu_command.sh.

It picks the profile, project, zone and TPU (from the API), then loops over actions until "exit". Each action runs
the very subcommand a user would type (`tpuctl check`, `tpuctl run RECIPE`, ...) as a child process with the picked
settings in its environment, so the menu cannot drift from the commands: it only chooses their arguments.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl import config
from tpuctl.errors import ConfigError, TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings

EXIT = "exit"


def require_terminal() -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise TpuctlError("the menu needs a terminal", "in scripts, use the subcommands: tpuctl --help")


def ask(question: Any) -> Any:
    """A questionary answer; Ctrl-C at a prompt leaves the menu (tpuctl: interrupted)."""
    return question.unsafe_ask()


def pick_settings(profile: str | None) -> dict[str, str]:
    """Profile (if the config file has several), then project, zone and TPU: the environment for every action."""
    import questionary

    env: dict[str, str] = {}
    profiles = _profiles()
    if profile is None and len(profiles) > 1:
        profile = ask(questionary.select("Profile", choices=profiles))
    if profile:
        env["TPUCTL_PROFILE"] = profile
    settings = config.resolve(env=os.environ | env, profile=profile)
    for name, question in (("project", "Google Cloud project"), ("zone", "Zone (e.g. us-central2-b)")):
        value = getattr(settings, name) or ask(questionary.text(question, validate=lambda v: bool(v.strip())))
        env[config.env_name(name)] = value.strip()
    settings = config.resolve(env=os.environ | env, profile=profile)
    env["TPUCTL_TPU"] = pick_tpu(settings)
    return env


def pick_tpu(settings: Settings) -> str:
    import questionary

    from tpuctl.cloud import TpuApi

    nodes = TpuApi(settings).list_nodes()
    if not nodes:
        raise TpuctlError(f"no TPUs in project {settings.project}, zone {settings.zone}", "create one first")
    choices = [
        questionary.Choice(f"{n.name}  ({n.state}, {n.accelerator_type}, {len(n.workers)} workers)", value=n.name)
        for n in nodes
    ]
    default = next((c for c in choices if c.value == settings.tpu), None)
    return str(ask(questionary.select("TPU", choices=choices, default=default)))


def _profiles() -> list[str]:
    try:
        return config.profile_names(config.config_file_path(os.environ))
    except ConfigError:
        return []  # `tpuctl` itself will say what is wrong with the file


def pick_recipe(command: str = "run") -> list[str] | None:
    import questionary

    recipes = sorted(str(p) for p in Path("recipes").glob("*.toml"))
    other = "another file..."
    choice = ask(questionary.select("Recipe", choices=[*recipes, other]))
    if choice == other:
        choice = ask(questionary.path("Recipe file", validate=lambda p: Path(p).is_file() or "no such file"))
    return [command, choice]


def pick_run() -> list[str]:
    """The run to act on: the only one, or one picked from those started from this machine."""
    import questionary

    from tpuctl import registry

    runs = registry.all_runs()
    if len(runs) <= 1:
        return [runs[0].name] if runs else []
    return [ask(questionary.select("Run", choices=[r.name for r in runs]))]


def pick_worker() -> list[str]:
    import questionary

    worker = ask(questionary.text("Worker", default="0", validate=lambda v: v.isdigit() or "a worker index"))
    return ["--worker", worker]


def confirm(what: str) -> bool:
    import questionary

    return bool(ask(questionary.confirm(what, default=False)))


# action -> the subcommand's arguments (None: nothing to do)
ACTIONS: dict[str, Callable[[], list[str] | None]] = {
    "list TPUs": lambda: ["list"],
    "ssh to a worker": lambda: ["ssh", *pick_worker()],
    "sync this directory": lambda: ["sync", "."],
    "prepare the environment": lambda: ["prepare"],
    "check the chips": lambda: ["check"],
    "kill the jobs": lambda: ["kill", "--yes"] if confirm("Kill the jobs on every worker?") else None,
    "clean TPU logs": lambda: ["clean-logs"],
    "run a recipe": pick_recipe,
    "status of a run": lambda: ["status", *pick_run()],
    "logs of a run": lambda: ["logs", *pick_run(), "-n", "50"],
    "stop a run": lambda: ["stop", *pick_run()] if confirm("Stop the run (it checkpoints first)?") else None,
    "describe the TPU": lambda: ["describe"],
    "babysit a recipe (until done)": lambda: pick_recipe("babysit"),
    "delete the TPU": lambda: ["delete", "--yes"] if confirm("Delete this TPU (its VMs and their disks)?") else None,
}


def run_action(args: list[str], env: dict[str, str]) -> int:
    """`tpuctl ARGS` as a child; Ctrl-C stops the child (e.g. a long sync), not the menu."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run([sys.executable, "-m", "tpuctl", *args], env=os.environ | env, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def loop(profile: str | None) -> None:
    import questionary

    require_terminal()
    env = pick_settings(profile)
    print(f"TPU {env['TPUCTL_TPU']} in {env['TPUCTL_PROJECT']}/{env['TPUCTL_ZONE']}")
    while True:
        action = ask(questionary.select("Action", choices=[*ACTIONS, EXIT]))
        if action == EXIT:
            return
        args = ACTIONS[action]()
        if args is None:
            continue
        code = run_action(args, env)
        if code not in (0, None):
            print(f"(tpuctl {args[0]} exited with {code})")
