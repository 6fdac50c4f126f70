"""Every command line sent to a worker's shell is built here, with shlex quoting, and nowhere else.

Bigger jobs (inspecting chips, killing holders, preparing a virtualenv) are small stdlib-only Python scripts in
tpuctl/scripts/, sent inline as `python3 -I -S -c SCRIPT ARGS_JSON`: nothing to install on the worker, no quoting of
data into code, and they answer with one JSON document on stdout.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from trainer import contract

# Where libtpu leaves its lock (old and new builds) and its logs; what counts as a crash dump.
LOCKFILE_GLOBS = (
    "/tmp/libtpu_lockfile",
    "/tmp/libtpu_lock_*",
    "/tmp/libtpu_lock_*/*",
    "/root/.libtpu_lockfile",
    "/home/*/.libtpu_lockfile",
)
TPU_LOG_DIR = "/tmp/tpu_logs"
# what /var/crash holds, not the directory (apport and kdump write there; tpu_command.sh's rm_tpu_logs emptied it)
CRASH_DUMP_GLOBS = ("/tmp/core", "/tmp/core.*", "/var/crash/*")
# tmux sessions tpuctl starts are named with this prefix, so `kill` stops ours and nobody else's.
SESSION_PREFIX = "tpuctl-"
SYNC_STAMP = ".tpuctl-sync"


def user_command(argv: Sequence[str]) -> str:
    """The remote command line for `tpuctl exec/ssh -- CMD`.

    One argument is a command line for the remote shell, sent as typed (pipes, $VARS and quotes work as in
    `ssh host 'CMD'`); several arguments are words, each quoted, so they arrive exactly as given.
    """
    if not argv:
        raise ValueError("empty command")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def privileged(argv: Sequence[str]) -> str:
    """Run argv as root: directly when we log in as root, else through passwordless sudo (as on TPU VMs)."""
    words = shlex.join(argv)
    return f'if [ "$(id -u)" -eq 0 ]; then {words}; else sudo -n {words}; fi'


@cache
def _script(name: str) -> str:
    return resources.files("tpuctl").joinpath("scripts", f"{name}.py").read_text()


def python_script(name: str, args: dict[str, Any], python: str = "python3") -> list[str]:
    """The script runs isolated (-I: no PYTHONPATH, no user site) and without site (-S): it needs the standard
    library alone, and a VM image's site-packages can cost each start tens of ms (their .pth imports), on every worker
    of every command."""
    return [python, "-I", "-S", "-c", _script(name), json.dumps(args, sort_keys=True)]


def chips_command(action: str, device_globs: Sequence[str], **options: Any) -> str:
    """check / kill / clean on the TPU chips of a worker; see scripts/chips.py for the JSON it prints."""
    args = {
        "action": action,
        "device_globs": list(device_globs),
        "lockfile_globs": list(LOCKFILE_GLOBS),
        "log_dir": TPU_LOG_DIR,
        "crash_globs": list(CRASH_DUMP_GLOBS),
        "session_prefix": SESSION_PREFIX,
        **options,
    }
    return privileged(python_script("chips", args))


# Where libtpu builds for older jax releases live (newer ones are on PyPI too): pip looks here on TPU hosts.
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# Seconds apt-get waits for dpkg's lock: a TPU VM that just booted runs unattended-upgrades, which holds it a while.
APT_LOCK_WAIT_S = 300


def apt_argv(action: str, packages: Sequence[str] = ()) -> list[str]:
    """apt-get update / install, non-interactive (`env` sets the frontend past sudo's env_reset).

    install uses --no-upgrade: a package the worker already has stays at its version, so workers made from one
    image keep matching versions; only missing ones are installed.
    """
    argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_S}"]
    if action == "update":
        return [*argv, "update"]
    if action == "install":
        return [*argv, "install", "-y", "--no-upgrade", *packages]
    raise ValueError(action)


def prepare_command(
    remote_dir: str,
    python: str,
    extras: str,
    pip_args: str,
    device_globs: Sequence[str],
    *,
    jax_version: str,
    apt_packages: Sequence[str] = (),
) -> str:
    """Make REMOTE_DIR/.venv on a worker; see scripts/prepare.py for what it runs and the JSON it prints.

    One pip resolution per host: the project with its extras, `jax[tpu]==V` (and libtpu's find-links) where TPU
    devices exist, and `jax==V` as a constraint everywhere, so whatever pulls jax in gets exactly V and no two
    workers of a pod can resolve different releases.
    """
    args = {
        "remote_dir": remote_dir,
        "extras": extras,
        "pip_args": shlex.split(pip_args),
        "device_globs": list(device_globs),
        "jax_version": jax_version,
        "requirements": {"tpu": [f"jax[tpu]=={jax_version}"], "other": []},
        "tpu_pip_args": ["--find-links", LIBTPU_FIND_LINKS],
        "constraints": [f"jax=={jax_version}"],
        "apt": {
            "packages": list(apt_packages),
            "update": apt_argv("update"),
            "install": apt_argv("install", apt_packages),
            "sudo": ["sudo", "-n"],  # prefixed when the login user is not root (passwordless sudo on TPU VMs)
        },
    }
    return shlex.join(python_script("prepare", args, python=python))


def rsync_path(remote_dir: str) -> str:
    """remote_dir as rsync and remote shells take it: '~/x' becomes 'x' (relative to the login directory)."""
    if remote_dir in ("~", "~/"):
        return "."
    return remote_dir[2:] if remote_dir.startswith("~/") else remote_dir


def apply_sync_batch(remote_dir: str, rsync_args: Sequence[str], old_stamp: str, new_stamp: str) -> str:
    """Apply an rsync batch (arriving on stdin) if the worker holds exactly the tree the batch was made against.

    Exit 98 with "stale:<stamp>" when it does not: the caller then syncs that worker in full. Shell builtins only,
    besides rsync itself: this runs on every worker at every sync, and forks add up.
    """
    return _at_stamp(remote_dir, old_stamp, new_stamp, shlex.join(["rsync", *rsync_args, "--read-batch=-", "."]))


def apply_sync_archive(remote_dir: str, old_stamp: str, new_stamp: str, deleted: Sequence[str]) -> str:
    """apply_sync_batch's form for a small change: a tar of the changed files on stdin, and the paths to delete.
    Cheaper on each worker than `rsync --read-batch`, which walks the whole file list to apply one edit."""
    remove = f"rm -rf -- {' '.join(shlex.quote(p) for p in deleted)} && " if deleted else ""
    return _at_stamp(remote_dir, old_stamp, new_stamp, f"{remove}tar -xf -")


def _at_stamp(remote_dir: str, old_stamp: str, new_stamp: str, apply: str) -> str:
    """`apply` in the synced directory if it holds the tree of `old_stamp`, then the stamp becomes `new_stamp`."""
    d = shlex.quote(rsync_path(remote_dir))
    stamp = shlex.quote(SYNC_STAMP)
    return (
        f"{{ [ -d {d} ] || mkdir -p {d}; }} && cd {d} || exit 97; "
        f"have=none; [ -f {stamp} ] && read -r have < {stamp}; "
        f'if [ "$have" != {shlex.quote(old_stamp)} ]; then echo "stale:$have"; exit 98; fi; '
        f"{apply} && printf '%s\\n' {shlex.quote(new_stamp)} > {stamp}"
    )


RSYNC_VERSION = "rsync --version"


def check_tree_command(remote_dir: str) -> str:
    """Check the synced directory against a manifest on stdin (sha256sum's format): exit 0 when every file is there
    with that content, else 1 and a `PATH: FAILED...` line for each that differs or is missing; 97 when the directory
    itself is missing. One read of the tree, coreutils only."""
    d = shlex.quote(rsync_path(remote_dir))
    return f"cd {d} 2>/dev/null || exit 97; LC_ALL=C sha256sum --quiet --check -"


def write_sync_stamp(remote_dir: str, stamp: str) -> str:
    d = shlex.quote(rsync_path(remote_dir))
    return f"printf '%s\\n' {shlex.quote(stamp)} > {d}/{shlex.quote(SYNC_STAMP)}"


# --- training runs (scripts/runs.py) -------------------------------------------------------------------------

# Each run keeps its pid, exit status and log here on every worker (under the login user's home).
RUNS_DIR = "~/.tpuctl/runs"


def session_name(slug: str) -> str:
    return SESSION_PREFIX + slug


def run_dir(slug: str) -> str:
    return f"{RUNS_DIR}/{slug}"


def trainer_argv(python: str, recipe: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    """`python -m trainer RECIPE --workdir DIR --set K=V ...`, as words (the worker script quotes them)."""
    argv = [python, "-m", "trainer", recipe, "--workdir", workdir]
    for item in overrides:
        argv += ["--set", item]
    return argv


def trainer_env(
    user_env: dict[str, str], coordinator: str | None, count: int, index: int, code: dict[str, Any] | None = None
) -> dict[str, str]:
    """The trainer's environment on worker `index` of `count`: unbuffered output (the log follows the run), the
    code's identity (the trainer writes it into the workdir), the jax.distributed wiring when there are several
    workers (dropped on TPU VMs, where JAX finds them itself), and what the user asked for, which wins."""
    env = {"PYTHONUNBUFFERED": "1"}
    if code is not None:
        env[contract.CODE_ENV] = json.dumps(code, sort_keys=True, separators=(",", ":"))
    if coordinator is not None and count > 1:
        env |= dict(zip(contract.DISTRIBUTED_ENV, (coordinator, str(count), str(index)), strict=True))
    return env | user_env


def run_command(action: str, python: str = "python3", **args: Any) -> str:
    """start / status / stop of one run on a worker; see scripts/runs.py for the JSON it prints. status reads the
    trainer's log by the contract's rules, sent along."""
    if action == "status":
        args = {"log_rules": contract.LOG_RULES, **args}
    return shlex.join(python_script("runs", {"action": action, **args}, python=python))


def shell_path(path: str) -> str:
    """A path for a remote shell: quoted, with a leading ~/ left for the shell to expand."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def tail_command(run_dir: str, lines: int, follow: bool) -> str:
    """The last `lines` lines of a run's log; with `follow`, what is appended too, until the trainer has ended (its
    pid file names it; GNU tail's --pid reads once more after the process is gone, so no last line is lost)."""
    log, pid = shell_path(f"{run_dir}/log"), shell_path(f"{run_dir}/pid")
    if not follow:
        return f"tail -n {int(lines)} {log}"
    return f'tail -n {int(lines)} -F --pid="$(cat {pid} 2>/dev/null || echo 1)" {log}'


def attach_command(session: str, switch: bool = False) -> str:
    """Attach a terminal to a run's tmux session; `switch` moves a client already inside tmux there instead."""
    return shlex.join(["tmux", "switch-client" if switch else "attach-session", "-t", "=" + session])


DOCTOR_TOOLS = ("rsync", "tmux")  # besides the python that makes the virtualenv


def doctor_command(remote_dir: str, python: str) -> str:
    """Whether the remote dir exists and the tools fleet commands use are there: one `dir 0|1` line and a
    `tool NAME 0|1` line each (plain sh: a worker without python3 must still answer)."""
    lines = [f"if test -d {shell_path(remote_dir)}; then echo 'dir 1'; else echo 'dir 0'; fi"]
    for tool in (python, *DOCTOR_TOOLS):
        found = shlex.quote(f"tool {tool} 1")
        lost = shlex.quote(f"tool {tool} 0")
        lines.append(f"if command -v {shlex.quote(tool)} >/dev/null 2>&1; then echo {found}; else echo {lost}; fi")
    return "\n".join(lines)


def doctor_answer(stdout: str) -> dict[str, Any]:
    """doctor_command's lines as {"dir": bool, "tools": {name: bool}}."""
    answer: dict[str, Any] = {"dir": False, "tools": {}}
    for line in stdout.splitlines():
        words = line.split()
        if words[:1] == ["dir"] and len(words) == 2:
            answer["dir"] = words[1] == "1"
        elif words[:1] == ["tool"] and len(words) == 3:
            answer["tools"][words[1]] = words[2] == "1"
    return answer
