"""Where settings come from: flags > environment (TPUCTL_*) > profile in the config file > gcloud config > default.

`Settings` is the one source of truth: each field carries its default, its type, its help text and its flag;
the CLI options, `tpuctl config show` and the environment names are all derived from it.
"""

from __future__ import annotations

import configparser
import dataclasses
import getpass
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import contract

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from tpuctl.errors import ConfigError

ENV_PREFIX = "TPUCTL_"
DEFAULT_CONFIG_PATH = "~/.config/tpuctl/config.toml"


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (some containers)
        return "root"


def local_jax_version() -> str | None:
    """The jax release installed where tpuctl runs: what `pip install -e '.[train]'` resolved the train extra to.

    Read from the installed distribution's metadata; jax itself is never imported. None when jax is not installed.
    """
    from importlib import metadata  # ~30 ms to import; the fleet commands' paramiko imports it anyway

    try:
        return metadata.version("jax")
    except metadata.PackageNotFoundError:
        return None


# A release as pip takes it after `jax==` (PEP 440, canonical spellings): "0.4.35", "0.5.0rc1", "0.4.36.dev20241201".
JAX_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[a-z0-9.]+)?")
# Debian policy 5.6.1/5.6.7: lowercase letters, digits, + - and .; at least two characters; starting with a letter
# or digit (so no name can pass for an apt-get option).
DEBIAN_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def _setting(default: Any, kind: str, help: str, flag: str | None = None, gcloud: str | None = None) -> Any:
    """A settings field. kind: str|int|float|bool|list|path. gcloud: 'section/key' in gcloud's config files.

    A callable default is called when the setting is resolved (not at import), for defaults read from this machine.
    """
    meta = {"kind": kind, "help": help, "flag": flag, "gcloud": gcloud}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    project: str | None = _setting(None, "str", "Google Cloud project.", "--project", gcloud="core/project")
    zone: str | None = _setting(None, "str", "Zone of the TPU, e.g. us-central2-b.", "--zone", gcloud="compute/zone")
    zones: list[str] = _setting(
        [],
        "list",
        "Zones a new TPU may go to, in order (create and babysit try the next when one has no capacity or quota;"
        " the menu lists TPUs across them); default: just the zone.",
        "--zones",
    )
    tpu: str | None = _setting(None, "str", "Name of the TPU node (pod).", "--tpu")
    backend: str = _setting(
        "auto",
        "str",
        "Where TPUs are: tpu (the Cloud TPU API's nodes), compute (Compute Engine: a managed instance group of TPU VMs"
        " or one TPU VM; v5p, v6e, TPU7x) or auto (a name the Cloud TPU API has is its node, else Compute Engine's"
        " slice; `list` shows both; `create` makes tpu7x on Compute Engine, the rest through the Cloud TPU API).",
        "--backend",
    )
    ssh_user: str = _setting(_local_user(), "str", "User to log in as on the workers.", "--ssh-user")
    ssh_key: str = _setting("~/.ssh/google_compute_engine", "path", "Private key for the workers.", "--ssh-key")
    ssh_keys: str = _setting(
        "auto",
        "str",
        "How ssh_key gets onto the workers, as gcloud does it (made if missing, ed25519): auto (into the OS Login"
        " profile when the TPU's metadata has enable-oslogin, else into its ssh-keys metadata, before the first"
        " connection; create and babysit put it into a new TPU's metadata), oslogin or metadata (that way whatever"
        " the TPU's metadata says: OS Login turned on for the project or by the organisation), or off (it is"
        " authorised there already).",
    )
    key_wait: float = _setting(
        180.0, "float", "Seconds to wait for the workers to accept a key just added (their guest agent's delay)."
    )
    account: str | None = _setting(
        None,
        "str",
        "Your Google account (OS Login profiles are per account); default: the service account of the credentials.",
        gcloud="core/account",
    )
    oslogin_endpoint: str = _setting(
        "https://oslogin.googleapis.com", "str", "OS Login API endpoint; http:// means an emulator (no credentials)."
    )
    compute_endpoint: str = _setting(
        "https://compute.googleapis.com",
        "str",
        "Compute Engine API endpoint (TPU VMs and their groups, the project's metadata); http:// means an emulator.",
    )
    storage_endpoint: str = _setting(
        "https://storage.googleapis.com",
        "str",
        "Cloud Storage JSON API endpoint (check_paths reads the recipe's gs:// paths through it); http:// means an"
        " emulator.",
    )
    check_paths: bool = _setting(
        True,
        "bool",
        "Before a pod run starts, check from this machine that the recipe's gs:// paths can be read and its workdir's"
        " bucket exists (with your credentials; the trainers check again with the workers').",
    )
    ssh_port: int = _setting(22, "int", "SSH port of the workers.", "--ssh-port")
    remote_dir: str = _setting("~/tpuctl", "str", "Project directory on the workers.", "--remote-dir")
    internal_ip: bool = _setting(
        False, "bool", "Reach workers by their internal IPs (from inside the VPC; the default with an ssh_proxy)."
    )
    ssh_proxy: str | None = _setting(
        None,
        "str",
        "How to reach workers that are not reachable directly: a jump host [USER@]HOST[:PORT] (logged in to with"
        " ssh_key and checked against known_hosts, like the workers) or a ProxyCommand, where %h, %p and %r stand for"
        " the worker's address, its port and the user (e.g. an IAP tunnel).",
        "--ssh-proxy",
    )
    concurrency: int = _setting(64, "int", "Most workers contacted at once.", "--concurrency")
    connect_timeout: float = _setting(10.0, "float", "Seconds to wait for a worker's SSH connection.")
    command_timeout: float = _setting(600.0, "float", "Seconds a remote command may run.", "--timeout")
    ssh_control_persist: float = _setting(
        300.0, "float", "Seconds an idle shared SSH connection (ControlMaster) waits for the next command; 0: off."
    )
    known_hosts: str = _setting("~/.config/tpuctl/known_hosts", "path", "tpuctl's own known_hosts file.")
    replace_host_keys: bool = _setting(False, "bool", "Accept workers whose host key changed (recreated VMs).")
    node_cache_s: float = _setting(
        300.0,
        "float",
        "Seconds a TPU's worker addresses are reused without asking the API (only at workers whose recorded host key"
        " confirms them; on any doubt the API is asked); 0: ask every time.",
    )
    device_globs: list[str] = _setting(list(contract.TPU_DEVICE_GLOBS), "list", "TPU device paths (globs).")
    api_timeout: float = _setting(30.0, "float", "Seconds a Cloud TPU API call may take, retries included.")
    api_poll: float = _setting(5.0, "float", "Seconds between looks at a TPU being created or deleted.")
    api_endpoint: str = _setting(
        "https://tpu.googleapis.com",
        "str",
        "Cloud TPU API endpoint; http:// means an emulator (no credentials).",
    )
    accelerator_type: str | None = _setting(None, "str", "Accelerator type `create` asks for, e.g. v4-32.", "--type")
    runtime_version: str | None = _setting(
        None,
        "str",
        "TPU VM software version `create` asks for; default: the one Google documents for the type (v6e:"
        " v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v4 and older: tpu-ubuntu2204-base).",
        "--runtime",
    )
    image: str | None = _setting(
        None,
        "str",
        "Boot image of new TPU VMs on Compute Engine (an image or a family, projects/P/global/images/...); default:"
        " Ubuntu 22.04 LTS (prepare installs jax[tpu] with its libtpu from PyPI).",
        "--image",
    )
    network: str | None = _setting(None, "str", "VPC network of new TPUs (default: the project's).", "--network")
    subnetwork: str | None = _setting(None, "str", "Subnetwork of new TPUs.", "--subnet")
    service_account: str | None = _setting(
        None,
        "str",
        "Service account new TPU VMs run as (default: the project's Compute Engine one).",
        "--service-account",
    )
    scopes: list[str] = _setting(
        ["cloud-platform"], "list", "OAuth scopes of that service account: short names or URLs.", "--scopes"
    )
    tags: list[str] = _setting([], "list", "Network tags of new TPU VMs (what firewall rules match).", "--tags")
    metadata: list[str] = _setting(
        [], "list", "KEY=VALUE metadata of new TPU VMs (comma-separated; values without commas).", "--metadata"
    )
    startup_script: str | None = _setting(
        None, "path", "A file new TPU VMs run at every boot (their startup-script metadata).", "--startup-script"
    )
    data_disks: list[str] = _setting(
        [],
        "list",
        "Persistent disks new TPU VMs attach: a disk of the zone by name or its full path, NAME:ro for read-only.",
        "--data-disk",
    )
    python: str = _setting("python3", "str", "Python on the workers used to create the virtualenv.")
    extras: str = _setting("train", "str", "Extras of the project that `prepare` installs on the workers.")
    pip_args: str = _setting("", "str", "Extra arguments for pip on the workers, e.g. an index URL.")
    jax_version: str | None = _setting(
        local_jax_version,
        "str",
        "JAX release `prepare` pins on every worker (jax[tpu]==V on TPU hosts, jax==V everywhere); default: the jax"
        " installed where tpuctl runs, i.e. what the train extra resolved to here.",
        "--jax-version",
    )
    apt_packages: list[str] = _setting(
        [],
        "list",
        "Debian packages `prepare` installs on every worker first (apt-get install -y, as root or via sudo -n).",
        "--apt-packages",
    )
    target: str = _setting("tpu", "str", "Where `run` trains: 'tpu' (the TPU's workers) or 'local' (this machine).")
    sync_excludes: list[str] = _setting(
        ["__pycache__", "*.pyc", "logs/"],
        "list",
        "What sync never sends, besides .git and what .gitignore ignores (rsync patterns, comma-separated; empty:"
        " nothing more). Workers keep their own copies of these.",
        "--sync-excludes",
    )
    workdir_root: str = _setting(
        "~/tpuctl-runs",
        "str",
        "Where runs keep checkpoints by default (WORKDIR_ROOT/RUN); a run on several workers needs a place they all"
        " see: a bucket (gs://BUCKET/runs) or a path under shared_dirs.",
    )
    shared_dirs: list[str] = _setting(
        [],
        "list",
        "Paths every worker sees as one place (an NFS or gcsfuse mount): a workdir under one may hold a multi-worker"
        " run's checkpoints.",
    )
    coordinator_port: int = _setting(8476, "int", "Port of worker 0's jax.distributed coordinator (non-TPU hosts).")
    # Where each value came from, for `tpuctl config show`.
    sources: dict[str, str] = field(default_factory=dict, compare=False, metadata={"kind": "internal"})

    def require(self, *names: str) -> None:
        """Raise one ConfigError naming every missing setting of `names` (zone: zones will do) and how to set each,
        so that one try brings all the news."""
        missing = [n for n in names if getattr(self, n) in (None, "") and not (n == "zone" and self.zones)]
        if len(missing) == 1:
            raise ConfigError(f"{missing[0]} is not set", how_to_set(missing[0]))
        if missing:
            listed = ", ".join(missing[:-1]) + f" and {missing[-1]}"
            raise ConfigError(f"{listed} are not set", "; ".join(f"{n}: {how_to_set(n)}" for n in missing))

    @property
    def internal_addresses(self) -> bool:
        """Whether workers are reached at their internal IPs: when asked to, and through a proxy unless told not to
        (a jump host or tunnel is inside the VPC)."""
        explicit = "internal_ip" in self.sources and not self.sources["internal_ip"].startswith("default")
        return self.internal_ip or (bool(self.ssh_proxy) and not explicit)

    def path(self, name: str) -> Path:
        return Path(os.path.expanduser(getattr(self, name)))


def setting_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if f.metadata.get("kind") != "internal"]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def how_to_set(name: str) -> str:
    f = next(f for f in setting_fields() if f.name == name)
    ways = [
        f"--{name.replace('_', '-')}" if f.metadata["flag"] is None else f.metadata["flag"],
        env_name(name),
    ]
    ways.append(f"'{name} = ...' in a profile of {DEFAULT_CONFIG_PATH}")
    if f.metadata["gcloud"]:
        section, key = f.metadata["gcloud"].split("/")
        ways.append(f"`gcloud config set {section}/{key} ...`")
    return "set it with " + ", ".join(ways[:-1]) + " or " + ways[-1]


def _parse(name: str, kind: str, raw: Any, origin: str) -> Any:
    """Turn a raw value (a string from env, or a TOML value) into the setting's type."""
    try:
        if kind in ("str", "path"):
            if not isinstance(raw, str):
                raise TypeError
            return raw
        if kind == "int":
            if isinstance(raw, bool):
                raise TypeError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return raw.lower() in ("1", "true", "yes", "on")
            raise TypeError
        if kind == "list":
            if isinstance(raw, str):
                return [p.strip() for p in raw.split(",") if p.strip()]
            if isinstance(raw, list) and all(isinstance(p, str) for p in raw):
                return list(raw)
            raise TypeError
    except (TypeError, ValueError):
        want = {"list": "a list of strings (comma-separated in env)", "path": "a path"}.get(kind, f"a {kind}")
        raise ConfigError(f"{name} from {origin} is {raw!r}, expected {want}") from None
    raise AssertionError(kind)


def _validate(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    checks = [
        ("ssh_port", lambda v: 1 <= v <= 65535, "a port between 1 and 65535"),
        ("concurrency", lambda v: v >= 1, "at least 1"),
        ("connect_timeout", lambda v: v > 0, "more than 0 seconds"),
        ("command_timeout", lambda v: v > 0, "more than 0 seconds"),
        ("api_timeout", lambda v: v > 0, "more than 0 seconds"),
        ("target", lambda v: v in ("tpu", "local"), "'tpu' or 'local'"),
        ("backend", lambda v: v in ("auto", "tpu", "compute"), "'auto', 'tpu' or 'compute'"),
        ("coordinator_port", lambda v: 1 <= v <= 65535, "a port between 1 and 65535"),
    ]
    for name, ok, want in checks:
        if not ok(values[name]):
            raise ConfigError(f"{name} = {values[name]!r} (from {sources[name]}) must be {want}")
    version = values["jax_version"]
    if version is not None and not JAX_VERSION_RE.fullmatch(version):
        raise ConfigError(
            f"jax_version = {version!r} (from {sources['jax_version']}) is not a JAX release",
            "give one version, e.g. 0.4.35, without == or >=",
        )
    for package in values["apt_packages"]:
        if not DEBIAN_PACKAGE_RE.fullmatch(package):
            raise ConfigError(
                f"apt_packages has {package!r} (from {sources['apt_packages']}), not a Debian package name",
                "lowercase letters, digits, '+', '-' and '.', at least 2 characters, starting with a letter or digit",
            )


# --- the layers -------------------------------------------------------------------------------------------


def config_file_path(env: Mapping[str, str]) -> Path:
    return Path(os.path.expanduser(env.get(env_name("config"), DEFAULT_CONFIG_PATH)))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    unknown = set(data) - {"default_profile", "profiles"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]!r} in {path}", "use default_profile or [profiles.NAME]")
    return data


def profile_names(path: Path) -> list[str]:
    """The config file's profiles, sorted ([] when there is no file)."""
    return sorted(_read_config(path).get("profiles", {})) if path.exists() else []


def load_profile(path: Path, wanted: str | None) -> tuple[str | None, dict[str, Any]]:
    """Return (profile name, its raw settings) from the config file; ({}, None) when there is none to use."""
    if not path.exists():
        if wanted:
            raise ConfigError(f"profile {wanted!r} asked for, but {path} does not exist", "create it or drop --profile")
        return None, {}
    data = _read_config(path)
    profiles = data.get("profiles", {})
    name = wanted or data.get("default_profile") or ("default" if "default" in profiles else None)
    if name is None:
        return None, {}
    if name not in profiles:
        have = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"profile {name!r} is not in {path}", f"profiles there: {have}")
    known = {f.name for f in setting_fields()}
    for key in profiles[name]:
        if key not in known:
            raise ConfigError(
                f"unknown setting {key!r} in profile {name!r} of {path}", f"known: {', '.join(sorted(known))}"
            )
    return name, dict(profiles[name])


def load_gcloud(env: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """Read gcloud's active configuration the way gcloud does, without running gcloud (it is slow)."""
    root = Path(os.path.expanduser(env.get("CLOUDSDK_CONFIG", "~/.config/gcloud")))
    name = env.get("CLOUDSDK_ACTIVE_CONFIG_NAME")
    if not name:
        try:
            name = (root / "active_config").read_text().strip() or "default"
        except OSError:
            name = "default"
    parser = configparser.ConfigParser()
    try:
        parser.read(root / "configurations" / f"config_{name}")
    except configparser.Error:
        return name, {}
    values = {f"{s}/{k}": v for s in parser.sections() for k, v in parser.items(s)}
    # gcloud's own environment overrides (CLOUDSDK_CORE_PROJECT, CLOUDSDK_COMPUTE_ZONE) beat its files.
    for key in ("core/project", "compute/zone"):
        override = env.get("CLOUDSDK_" + key.replace("/", "_").upper())
        if override:
            values[key] = override
    return name, values


def resolve(
    flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, profile: str | None = None
) -> Settings:
    """Resolve every setting through the layers; `flags` holds values given on the command line (None = not given)."""
    env = os.environ if env is None else env
    flags = flags or {}
    path = config_file_path(env)
    profile_name, profile_values = load_profile(path, profile or env.get(env_name("profile")) or None)
    gcloud_name, gcloud_values = load_gcloud(env)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in setting_fields():
        kind, name = f.metadata["kind"], f.name
        if flags.get(name) is not None:
            flag = f.metadata["flag"] or "--" + name.replace("_", "-")
            values[name], sources[name] = _parse(name, kind, flags[name], f"flag {flag}"), f"flag {flag}"
        elif env.get(env_name(name)):
            origin = f"env {env_name(name)}"
            values[name], sources[name] = _parse(name, kind, env[env_name(name)], origin), origin
        elif name in profile_values:
            origin = f"profile {profile_name} ({path})"
            values[name], sources[name] = _parse(name, kind, profile_values[name], origin), origin
        elif f.metadata["gcloud"] and gcloud_values.get(f.metadata["gcloud"]):
            values[name], sources[name] = gcloud_values[f.metadata["gcloud"]], f"gcloud config {gcloud_name}"
        else:
            values[name] = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            sources[name] = "default"
    _validate(values, sources)
    return Settings(**values, sources=sources)
