"""`tpuctl menu`: the interactive menu that replaces OpenVision's tpu_command.sh.

It picks the profile, project and TPU (listed from the API across the profile's zones, or created there), then
loops over actions until "exit". Each action runs the very subcommand a user would type (`tpuctl check`, `tpuctl run
RECIPE`, ...) as a child process with the picked settings in its environment, so the menu cannot drift from the
commands: it only chooses their arguments.
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
from tpuctl.errors import CloudError, ConfigError, TpuctlError

if TYPE_CHECKING:
    from tpuctl.cloud import Node, Queued, TpuApi
    from tpuctl.config import Settings

EXIT = "exit"


def require_terminal() -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise TpuctlError("the menu needs a terminal", "in scripts, use the subcommands: tpuctl --help")


def ask(question: Any) -> Any:
    """A questionary answer; Ctrl-C at a prompt leaves the menu (tpuctl: interrupted)."""
    return question.unsafe_ask()


def pick_settings(profile: str | None) -> dict[str, str]:
    """Profile (if the config file has several), then project, the TPU (listed across the profile's zones, or made
    anew): the environment for every action."""
    import questionary

    env: dict[str, str] = {}
    profiles = _profiles()
    if profile is None and len(profiles) > 1:
        profile = ask(questionary.select("Profile", choices=profiles))
    if profile:
        env["TPUCTL_PROFILE"] = profile
    settings = config.resolve(env=os.environ | env, profile=profile)
    project = settings.project or ask(questionary.text("Google Cloud project", validate=_given))
    env["TPUCTL_PROJECT"] = project.strip()
    zones = list(settings.zones) or ([settings.zone] if settings.zone else [])
    if not zones:
        zones = [ask(questionary.text("Zone (e.g. us-central2-b)", validate=_given)).strip()]
    settings = config.resolve(env=os.environ | env | {"TPUCTL_ZONE": zones[0]}, profile=profile)  # for TpuApi
    name, zone = pick_tpu(settings, zones, env)
    return env | {"TPUCTL_TPU": name, "TPUCTL_ZONE": zone}


def _given(text: str) -> bool:
    return bool(text.strip())


NEW_TPU = "create a new TPU..."


def pick_tpu(settings: Settings, zones: list[str], env: dict[str, str]) -> tuple[str, str]:
    """A TPU of the project in any of `zones` (name, zone), or one made now through `tpuctl create`."""
    import questionary

    from tpuctl import slices
    from tpuctl.cloud import TpuApi

    api = TpuApi(settings)
    nodes = [] if settings.backend == "compute" else [n for zone in zones for n in api.in_zone(zone).list_nodes()]
    nodes += slices.compute_nodes(settings, zones)
    choices = [
        questionary.Choice(
            f"{n.name}  ({n.state}, {n.accelerator_type}, {len(n.workers)} workers) in {n.zone}", value=(n.name, n.zone)
        )
        for n in nodes
    ]
    default = next((c for c in choices if c.value and c.value[0] == settings.tpu), None)
    waiting = [  # requests in line have no node to act on: shown, not picked
        questionary.Choice(
            f"{q.name}  (queued: {q.state}, {q.accelerator_type}) in {q.zone}",
            disabled=f"no node yet; `tpuctl delete {q.name} --zone {q.zone}` cancels it",
        )
        for q in ([] if settings.backend == "compute" else _waiting_requests(api, zones, nodes))
    ]
    picked = ask(questionary.select("TPU", choices=[*choices, *waiting, NEW_TPU], default=default))
    if picked != NEW_TPU:
        return tuple(picked)
    made = create_tpu(settings, zones, env)
    if made is None:
        raise TpuctlError("no TPU was created", "see tpuctl create's message above")
    return made


def _waiting_requests(api: TpuApi, zones: list[str], nodes: list[Node]) -> list[Queued]:
    """The zones' queued resources that have no node yet (none where the API will not list them)."""
    found = []
    for zone in zones:
        try:
            found += api.in_zone(zone).waiting_requests(nodes)
        except CloudError:
            continue
    return found


CAPACITY = {
    "on demand": [],
    "spot (cheaper, may be preempted)": ["--spot"],
    "queued (waits in line for capacity)": ["--queued"],
    "queued spot": ["--queued", "--spot"],
}


def create_tpu(settings: Settings, zones: list[str], env: dict[str, str]) -> tuple[str, str] | None:
    """Ask for the new TPU's name, type, zone and capacity, then run `tpuctl create` with them; (name, zone) when it
    is READY, None when create failed."""
    import questionary

    from tpuctl.cloud import TAG_RE

    name = ask(questionary.text("Name", validate=lambda v: bool(TAG_RE.fullmatch(v)) or "lowercase, digits and -"))
    kind = ask(questionary.text("Accelerator type", default=settings.accelerator_type or "v4-8", validate=_given))
    first_free = f"the first of {', '.join(zones)} with room"
    where = [first_free, *zones] if len(zones) > 1 else zones
    zone = ask(questionary.select("Zone", choices=where))
    capacity = CAPACITY[ask(questionary.select("Capacity", choices=list(CAPACITY)))]
    zone_args = ["--zones", ",".join(zones)] if zone == first_free else ["--zone", zone]
    if run_action(["create", name, "--type", kind.strip(), *zone_args, *capacity], env) != 0:
        return None
    import dataclasses

    from tpuctl import slices

    found = next((z for z in zones if slices.find(dataclasses.replace(settings, zone=z), name)[1] is not None), zone)
    return name, found


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
    # a pod's workers must all see the workdir (checkpoints on a VM's own disk are lost with it)
    workdir = ask(questionary.text("Workdir for checkpoints (gs://BUCKET/PATH; empty: workdir_root/RUN)")).strip()
    return [command, choice, *(["--workdir", workdir] if workdir else [])]


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
    "doctor (what is missing)": lambda: ["doctor"],
}


def run_action(args: list[str], env: dict[str, str]) -> int:
    """`tpuctl ARGS` as a child; Ctrl-C stops the child (e.g. a long sync), not the menu."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run([sys.executable, "-m", "tpuctl", *args], env=os.environ | env, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def first_screen(env: dict[str, str]) -> None:
    """`tpuctl doctor` on the picked TPU: its findings first when something is wrong, else one line."""
    print("Checking the TPU (tpuctl doctor) ...", flush=True)
    doctor = [sys.executable, "-m", "tpuctl", "doctor"]
    r = subprocess.run(doctor, env=os.environ | env, capture_output=True, text=True, check=False)
    if r.returncode == 0:
        print("All checks passed.")
    else:
        sys.stdout.write(r.stdout + r.stderr)


def loop(profile: str | None) -> None:
    import questionary

    require_terminal()
    env = pick_settings(profile)
    print(f"TPU {env['TPUCTL_TPU']} in {env['TPUCTL_PROJECT']}/{env['TPUCTL_ZONE']}")
    first_screen(env)
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
