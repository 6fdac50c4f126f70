"""tpuctl prepare: a real virtualenv with the synced project, made on every worker, idempotently, jax pinned.

The workers here cannot reach PyPI, so the project prepared is a small one without dependencies, installed with
--no-index (the same pip install -e path that installs the trainer's `train` extra on a pod). It is a setup.py
project because the workers' venv has setuptools but not `wheel`, which a PEP 660 editable build needs offline.
Where jax must be installed, a local find-links directory stands in for PyPI: it holds real wheels of a tiny
distribution named jax, at this environment's jax version and at a newer one (the real jax needs jaxlib, numpy and
scipy: hundreds of MB per worker, and no wheels of them are on this machine).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from standins import image

from tpuctl import config, ops, remote
from tpuctl.errors import ConfigError

PIP_ARGS = image.OFFLINE_PIP_ARGS
LOCAL_JAX = metadata.version("jax")  # the test extra installs jax: the default pin
NEWER_JAX = "99.0"


@pytest.fixture
def toy_project(tmp_path):
    src = tmp_path / "toy"
    (src / "toypkg").mkdir(parents=True)
    (src / "toypkg" / "__init__.py").write_text("ANSWER = 42\n")
    (src / "setup.py").write_text(
        'from setuptools import setup\n\nsetup(name="toypkg", version="0.1", packages=["toypkg"],'
        ' extras_require={"extra": []})\n'
    )
    return src


def prepare(pod, *args):
    r = pod.tpuctl("prepare", "--pip-args", PIP_ARGS, "--extras", "extra", "--json", *args, timeout=240)
    return r, json.loads(r.stdout) if r.stdout.strip() else None


def test_prepare_makes_a_venv_with_the_project_and_is_idempotent(pod, toy_project):
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    r, data = prepare(pod)
    assert r.returncode == 0, r.stderr
    assert [d["changed"] for d in data] == [True, True]
    assert [d["venv"] for d in data] == ["/root/tpuctl/.venv"] * 2
    run = pod.tpuctl("exec", "--", "tpuctl/.venv/bin/python -c 'import toypkg; print(toypkg.ANSWER)'")
    assert sorted(run.stdout.splitlines()) == ["[w0] 42", "[w1] 42"]
    # code synced later is picked up without reinstalling (editable install) ...
    (toy_project / "toypkg" / "__init__.py").write_text("ANSWER = 43\n")
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    r, data = prepare(pod)
    assert r.returncode == 0 and [d["changed"] for d in data] == [False, False]
    assert all(d["seconds"] < 5 for d in data)
    run = pod.tpuctl("exec", "--workers", "1", "--", "tpuctl/.venv/bin/python -c 'import toypkg; print(toypkg.ANSWER)'")
    assert run.stdout.strip() == "[w1] 43"
    # ... while a change to the project's metadata reinstalls
    setup = toy_project / "setup.py"
    setup.write_text(setup.read_text().replace('version="0.1"', 'version="0.2"'))
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    r, data = prepare(pod)
    assert [d["changed"] for d in data] == [True, True]


def test_prepare_before_sync_says_what_to_do(pod):
    r, data = prepare(pod)
    assert r.returncode == 1
    assert "holds no Python project" in data[0]["error"] and "tpuctl sync" in data[0]["error"]


def test_prepare_reports_a_failing_pip_per_worker(pod, toy_project):
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    r = pod.tpuctl("prepare", "--pip-args", PIP_ARGS, "--extras", "missing-dep-extra", timeout=240)
    # an unknown extra is only a warning for pip; a requirement that cannot be found is an error
    assert r.returncode == 0
    setup = toy_project / "setup.py"
    setup.write_text(setup.read_text().replace('"extra": []', '"extra": ["not-on-any-index-xyz"]'))
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    r = pod.tpuctl("prepare", "--pip-args", PIP_ARGS, "--extras", "extra", timeout=240)
    assert r.returncode == 1
    assert r.stderr.count("pip install -e") == 2 and "not-on-any-index-xyz" in r.stderr


def test_prepare_dry_run_prints_the_pins_and_the_remote_command(pod):
    r = pod.tpuctl("prepare", "--dry-run", "--jax-version", "0.4.35", "--apt-packages", "libgl1,ffmpeg")
    assert r.returncode == 0
    assert r.stderr.splitlines()[0] == (
        "Would install apt packages libgl1 ffmpeg, then the project[train] with jax==0.4.35"
        " (jax[tpu]==0.4.35 on hosts with TPU devices)"
    )
    assert r.stdout == "" and "tpuctl -v prepare --dry-run" in r.stderr  # the summary; the script when asked
    r = pod.tpuctl("-v", "prepare", "--dry-run", "--jax-version", "0.4.35", "--apt-packages", "libgl1,ffmpeg")
    assert r.stdout.startswith("python3 -I -S -c ") and '"remote_dir": "~/tpuctl"' in r.stdout
    assert '"constraints": ["jax==0.4.35"]' in r.stdout and '"packages": ["libgl1", "ffmpeg"]' in r.stdout
    assert pod.tpuctl("prepare", "--dry-run").stderr.startswith(
        f"Would install the project[train] with jax=={LOCAL_JAX} "
    )


# --- the jax pin ----------------------------------------------------------------------------------------------


def write_wheel(directory: Path, name: str, version: str) -> None:
    """A real, minimal wheel (PEP 427) of a pure-Python distribution whose module says its version."""
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nProvides-Extra: tpu\n"
        ),
        f"{name}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join([*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


@pytest.fixture
def wheelhouse(shared):
    """A find-links directory every worker sees, holding jax at this environment's version and a newer one."""
    for version in (LOCAL_JAX, NEWER_JAX):
        write_wheel(shared, "jax", version)
    return shared


def test_prepare_pins_jax_on_every_worker_and_a_new_pin_prepares_again(pod, toy_project, wheelhouse):
    setup = toy_project / "setup.py"
    setup.write_text(setup.read_text().replace('"extra": []', '"extra": ["jax"]'))  # as the train extra pulls it in
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    pin = ("--pip-args", f"{PIP_ARGS} --find-links {wheelhouse}")
    # no jax_version set: this environment's jax, although the index offers a newer one
    r = pod.tpuctl("prepare", "--extras", "extra", "--json", *pin, timeout=240)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [(d["changed"], d["jax"], d["tpu"]) for d in data] == [(True, LOCAL_JAX, False)] * 2
    for w in pod.fleet.workers:  # the pin as pip took it, kept in the venv
        assert w.path("/root/tpuctl/.venv/.tpuctl-constraints.txt").read_text() == f"jax=={LOCAL_JAX}\n"
    # the same pin again is a no-op ...
    r = pod.tpuctl("prepare", "--extras", "extra", "--json", "--jax-version", LOCAL_JAX, *pin, timeout=240)
    assert [d["changed"] for d in json.loads(r.stdout)] == [False, False]
    # ... a new one (here from the environment) prepares again, and every worker gets exactly it
    env = {"TPUCTL_JAX_VERSION": NEWER_JAX}
    r = pod.tpuctl("prepare", "--extras", "extra", "--json", *pin, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert [(d["changed"], d["jax"]) for d in json.loads(r.stdout)] == [(True, NEWER_JAX)] * 2
    run = pod.tpuctl("exec", "--", "tpuctl/.venv/bin/python -c 'import jax; print(jax.__version__)'")
    assert sorted(run.stdout.splitlines()) == [f"[w0] {NEWER_JAX}", f"[w1] {NEWER_JAX}"]
    r = pod.tpuctl("prepare", "--extras", "extra", "--json", *pin, env=env, timeout=240)
    assert [d["changed"] for d in json.loads(r.stdout)] == [False, False]


def test_prepare_command_pins_jax_tpu_on_tpu_hosts_and_jax_everywhere():
    settings = config.Settings(jax_version="0.4.35", apt_packages=["libgl1"])
    words = shlex.split(ops.prepare_command(settings))
    assert words[:4] == ["python3", "-I", "-S", "-c"]  # stdlib alone: no site-packages, no PYTHONPATH
    args = json.loads(words[5])
    assert args["requirements"] == {"tpu": ["jax[tpu]==0.4.35"], "other": []}
    assert args["tpu_pip_args"] == ["--find-links", remote.LIBTPU_FIND_LINKS]
    assert args["constraints"] == ["jax==0.4.35"]
    assert args["apt"]["install"][-4:] == ["install", "-y", "--no-upgrade", "libgl1"]


def test_no_jax_to_pin_says_how_to_set_one():
    with pytest.raises(ConfigError) as e:
        ops.prepare_command(config.Settings(jax_version=None))
    assert str(e.value).startswith("jax_version is not set, and jax is not installed here to take the version from")
    assert "--jax-version, TPUCTL_JAX_VERSION" in str(e.value) and "pip install -e '.[train]'" in str(e.value)


# --- apt packages ---------------------------------------------------------------------------------------------


def test_prepare_installs_apt_packages_on_every_worker(pod, toy_project):
    # The stand-in workers share this machine's root file system, hence its dpkg database, so a package new to
    # them would be installed on this machine, from the network (apt-get update reaches the Debian mirror). So the
    # packages here are ones every stand-in worker has anyway (rsync, which sync needs; tmux, which run needs): prepare
    # finds them installed, skips the update, and still runs the real apt-get install on each worker, both at
    # once on one dpkg database (which DPkg::Lock::Timeout makes them take in turn, as unattended-upgrades would
    # on a TPU VM that just booted). A missing package takes the same path after apt-get update.
    assert pod.tpuctl("sync", str(toy_project)).returncode == 0
    r, data = prepare(pod, "--apt-packages", "rsync,tmux")
    assert r.returncode == 0, r.stderr
    for d in data:
        assert d["changed"] is True
        apt = d["apt"]
        assert (apt["packages"], apt["missing"], apt["updated"]) == (["rsync", "tmux"], [], False)
        assert apt["summary"].startswith("0 upgraded, 0 newly installed, 0 to remove")  # apt-get's own last line
    # the packages are in the stamp: the same list is a no-op, another prepares again
    r, data = prepare(pod, "--apt-packages", "tmux,rsync")
    assert [(d["changed"], d["apt"]) for d in data] == [(False, None)] * 2
    env = {"TPUCTL_APT_PACKAGES": "rsync"}  # as a profile's apt_packages = ["rsync"] would
    r = pod.tpuctl("prepare", "--pip-args", PIP_ARGS, "--extras", "extra", "--json", env=env, timeout=240)
    assert [(d["changed"], d["apt"]["packages"]) for d in json.loads(r.stdout)] == [(True, ["rsync"])] * 2


@pytest.mark.parametrize(
    ("how", "bad"),
    [("--apt-packages", "Tmux"), ("TPUCTL_APT_PACKAGES", "tmux;reboot"), ("--apt-packages", "-y")],
)
def test_a_bad_package_name_is_one_line_and_nothing_is_sent(pod, how, bad):
    packages = f"rsync,{bad}"
    flag = how.startswith("--")
    r = pod.tpuctl("prepare", *([how, packages] if flag else []), env=None if flag else {how: packages})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"tpuctl: error: apt_packages has {bad!r} (from ")
    assert "not a Debian package name" in r.stderr and r.stderr.count("\n") == 1
    assert pod.api.requests == []  # not even the workers were looked up


def test_apt_packages_without_root_or_sudo_is_a_clear_error():
    """The script itself, as a user who is not root, on this machine, which has no sudo."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as project:  # pytest's tmp_path is closed to other users
        Path(project).chmod(0o755)
        Path(project, "pyproject.toml").write_text("[project]\nname = 'x'\n")
        settings = config.Settings(remote_dir=project, jax_version="0.4.35", apt_packages=["tmux"])
        command = ops.prepare_command(settings)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c", command]
        env = {**os.environ, "PATH": "/usr/bin:/bin"}
        r = subprocess.run(nobody, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 5
    message = "apt_packages need root: the login user is not root and this worker has no sudo"
    assert json.loads(r.stdout) == {"error": message} and r.stderr == message + "\n"
