"""tpuctl's own SSH key, and its line in a TPU node's `ssh-keys` metadata, the way gcloud does both.

gcloud makes `~/.ssh/google_compute_engine` on first use and adds `USER:KEY USER` to the node's `ssh-keys` metadata;
the guest agent on every VM turns those lines into USER's authorized keys. tpuctl does the same with the key it is
told to use (`ssh_key`), making an ed25519 key where there is none and never touching one that exists.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.errors import ConfigError

if TYPE_CHECKING:
    from tpuctl.config import Settings

SSH_KEYS = "ssh-keys"  # the node metadata key the guest agent reads (one `user:type base64 comment` per line)
MODES = ("auto", "metadata", "oslogin", "off")  # the ssh_keys setting (tpuctl.access)


def public_key(path: Path) -> str:
    """`type base64` of the private key at `path`: its `.pub` beside it, else derived from the key itself."""
    pub = path.with_name(path.name + ".pub")
    if pub.is_file():
        words = pub.read_text().split()
        if len(words) >= 2:
            return f"{words[0]} {words[1]}"
    from tpuctl.ssh import load_key_file

    key = load_key_file(path)
    return f"{key.get_name()} {key.get_base64()}"


def ensure_key(path: Path, comment: str) -> tuple[str, bool]:
    """The public key (`type base64`) of `path`, and whether it was made now: an ed25519 key without a passphrase
    (mode 0600, its `.pub` beside it), as gcloud makes its key; an existing key is never overwritten."""
    if path.exists():
        return public_key(path), False
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: a key another process made in the meantime is kept, not replaced
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return public_key(path), False
    except OSError as e:
        raise ConfigError(f"cannot make SSH key {path}: {e.strerror}", "set --ssh-key to a writable path") from None
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    path.with_name(path.name + ".pub").write_text(f"{public.decode()} {comment}\n")
    return public.decode(), True


def metadata_line(user: str, public: str) -> str:
    """The `ssh-keys` line that lets `user` log in with `public` (`type base64`), as gcloud writes it."""
    return f"{user}:{public} {user}"


def has_key(ssh_keys: str, user: str, public: str) -> bool:
    """Whether the `ssh-keys` text already authorises `public` for `user` (whatever the line's comment)."""
    want = public.split()[:2]
    for line in ssh_keys.splitlines():
        name, sep, key = line.strip().partition(":")
        if sep and name == user and key.split()[:2] == want:
            return True
    return False


def with_key(ssh_keys: str, user: str, public: str) -> str | None:
    """The `ssh-keys` text with one line for `user`'s `public` added, every other line kept as it was; None when it is
    there already (nothing to write)."""
    if has_key(ssh_keys, user, public):
        return None
    lines = [line for line in ssh_keys.splitlines() if line.strip()]
    return "\n".join([*lines, metadata_line(user, public)])


def managed(settings: Settings) -> bool:
    """Whether tpuctl puts its key onto the workers itself (any ssh_keys but "off"), rather than finding it there."""
    if settings.ssh_keys not in MODES:
        raise ConfigError(f"ssh_keys = {settings.ssh_keys!r} is not one of {', '.join(MODES)}", "set ssh_keys = auto")
    return settings.ssh_keys != "off"


def for_new_node(settings: Settings, make: bool = True) -> str | None:
    """The public key a new TPU's metadata should authorise for ssh_user (so its VMs accept tpuctl from their first
    boot), made now if `make` and missing; None with ssh_keys = "off". A dry run (`make` False) with no key yet shows
    where the key would be made instead of making it."""
    if not managed(settings):
        return None
    path = settings.path("ssh_key")
    if not make and not path.exists():
        return f"ssh-ed25519 KEY-TO-BE-MADE-AT:{path}"
    return ensure_key(path, f"{settings.ssh_user}@{socket.gethostname()}")[0]
