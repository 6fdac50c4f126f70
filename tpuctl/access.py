"""Before a fleet command's first connection to a TPU: tpuctl's key is authorised on its workers for the user it
logs in as, the way gcloud makes it so for `gcloud compute tpus tpu-vm ssh`.

Which way depends on the project: with OS Login (`enable-oslogin` TRUE in the node's metadata, else in the project's,
or ssh_keys = "oslogin" where the organisation enforces it) the key goes into the caller's OS Login profile and the
login user is the profile's POSIX name; otherwise it goes into the node's `ssh-keys` metadata for ssh_user. Either way
the guest agent on each VM takes it up some seconds later, so a key that was just put there is waited for, worker by
worker, until every one accepts it. A key that is there already costs nothing: the node the command read anyway says
so (metadata), or one profile read does (OS Login).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tpuctl import keys
from tpuctl.errors import ConfigError, TpuctlError

if TYPE_CHECKING:
    from tpuctl.cloud import Node, Worker
    from tpuctl.config import Settings

# How metadata turns a flag on or off (Compute Engine reads TRUE/true/1/yes and FALSE/false/0/no).
_ON, _OFF = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def metadata_flag(value: str | None) -> bool | None:
    """A metadata value as a flag: True, False, or None when it says neither (absent)."""
    word = (value or "").strip().lower()
    return True if word in _ON else False if word in _OFF else None


def uses_oslogin(settings: Settings, node: Node, say: Callable[[str], None] = lambda _: None) -> bool:
    """Whether the workers take keys from OS Login rather than from the node's ssh-keys metadata: as ssh_keys
    forces, else as the node's metadata says, else as the project's does (a VM's own metadata overrides its
    project's, as on Compute Engine). A project whose metadata cannot be read goes by ssh-keys, saying so."""
    if settings.ssh_keys in ("oslogin", "metadata"):
        return settings.ssh_keys == "oslogin"
    node_says = metadata_flag(dict(node.metadata).get("enable-oslogin"))
    if node_says is not None:
        return node_says
    from tpuctl import compute

    try:
        return bool(compute.project_oslogin(settings))
    except TpuctlError as e:
        say(f"{e}; going by the TPU's ssh-keys metadata")
        return False


@dataclasses.dataclass(frozen=True)
class Access:
    settings: Settings  # the settings to connect with (ssh_user: the OS Login POSIX name where that applies)
    how: str  # "metadata", "oslogin" or "off" (not managed by tpuctl)
    added: bool  # the key was put there just now: the workers take it up only after a while


def prepare(settings: Settings, node: Node, say: Callable[[str], None] = lambda _: None) -> Access:
    """Make sure tpuctl's key (made if missing) is authorised on `node` for the user it will log in as."""
    path = settings.path("ssh_key")
    public = key_file(settings, say)
    if public is None:
        return Access(settings, "off", False)
    if uses_oslogin(settings, node, say):
        from tpuctl.oslogin import OsLogin

        oslogin = OsLogin(settings)
        user, added = oslogin.authorize(public)
        if added:
            say(f"Added SSH key {path} to the OS Login profile of {oslogin.account} (user {user!r})")
        # the way found, from here on (a refusal's hint names it); the profile's user unless ssh_user was set
        settings = dataclasses.replace(settings, ssh_keys="oslogin")
        if settings.sources.get("ssh_user", "default").startswith("default"):
            settings = dataclasses.replace(settings, ssh_user=user)
        return Access(settings, "oslogin", added)
    settings = dataclasses.replace(settings, ssh_keys="metadata")
    if keys.has_key(dict(node.metadata).get(keys.SSH_KEYS, ""), settings.ssh_user, public):
        return Access(settings, "metadata", False)
    from tpuctl import lifecycle, slices

    say(f"Adding SSH key {path} for {settings.ssh_user!r} to the ssh-keys metadata of TPU {node.name!r}")
    api = slices.api_of(settings, node)
    lifecycle.add_ssh_key(api, node.name, settings.ssh_user, public, poll=min(2.0, settings.api_poll))
    return Access(settings, "metadata", True)


def key_file(settings: Settings, say: Callable[[str], None] = lambda _: None) -> str | None:
    """tpuctl's public key, the key made now where it is missing (as gcloud makes its own); None with ssh_keys =
    "off", where a missing key is one line instead."""
    path = settings.path("ssh_key")
    if not keys.managed(settings):
        if not path.exists():
            raise missing_key(settings)
        return None
    public, made = keys.ensure_key(path, f"{settings.ssh_user}@{socket.gethostname()}")
    if made:
        say(f"Made SSH key {path} (ed25519), as gcloud would")
    return public


def wait_accepted(
    settings: Settings,
    workers: Sequence[Worker],
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once every worker accepts the key (or cannot be reached at all: the command itself reports those);
    ask again, more slowly each time, those that still refuse it, until key_wait seconds have passed."""
    from tpuctl.fleet import Fleet

    deadline = time.monotonic() + settings.key_wait
    waiting, pause = list(workers), 0.5
    while True:
        results = Fleet(settings, waiting).run("true", timeout=max(5.0, settings.connect_timeout))
        waiting = [r.worker for r in results if r.refused]
        on_progress(len(workers) - len(waiting), len(workers))
        if not waiting:
            return
        if time.monotonic() + pause > deadline:
            names = ", ".join(f"w{w.index}" for w in waiting[:8]) + (" ..." if len(waiting) > 8 else "")
            raise TpuctlError(
                f"{len(waiting)} of {len(workers)} workers ({names}) still refuse the SSH key {settings.ssh_key} for"
                f" {settings.ssh_user!r} {settings.key_wait:g} s after it was added",
                "their guest agent may be down (see `tpuctl doctor`); run the command again to wait longer",
            )
        sleep(pause)
        pause = min(pause * 1.5, 5.0)


def refused_hint(settings: Settings) -> str:
    """What to do about a worker that refuses tpuctl's key, by where tpuctl put it."""
    if settings.ssh_keys == "off":
        return (
            f"ssh_keys = off: authorise {settings.ssh_key}.pub for that user on the workers yourself, or set"
            " ssh_keys = auto to let tpuctl add it"
        )
    if settings.ssh_keys == "oslogin":
        return "the key is in your OS Login profile: you need roles/compute.osLogin on the project (tpuctl doctor)"
    return (
        "the key is in the TPU's ssh-keys metadata; if the project or organisation enforces OS Login, set"
        " ssh_keys = oslogin (tpuctl doctor)"
    )


def missing_key(settings: Settings) -> ConfigError:
    """The key file is missing and tpuctl may not make it (ssh_keys = off)."""
    return ConfigError(
        f"SSH key {settings.path('ssh_key')} does not exist and ssh_keys = off",
        "set --ssh-key to the key the workers accept, or ssh_keys = auto to let tpuctl make and add one",
    )
