"""Runs ON A WORKER, sent by tpuctl.remote.prepare_command: make REMOTE_DIR/.venv with the project installed.

Stdlib only, Python 3.8+. In order: the apt packages (first: python3-venv or a build dependency may be one of
them), the venv, then one pip install of the project with its extras, `jax[tpu]==V` on hosts with TPU devices and
`jax==V` as a constraint on every host. Every command it runs comes in its JSON argument, built by tpuctl.remote.

Idempotent: a stamp in the venv records what was installed (project metadata, extras, pip arguments, Python, TPU or
not, the jax pin, the apt packages); when nothing changed, and the venv's jax is still the pinned one, it returns at
once. The project is installed editable, so code synced later needs no reinstall. Prints one JSON document on
stdout; pip's and apt-get's output goes to stderr.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

METADATA_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
APT_LISTS_LOCK_WAIT_S = 300  # `apt-get update` does not wait for its lock itself (DPkg::Lock::Timeout is dpkg's)


def fail(message, code=3):
    sys.stderr.write(message + "\n")
    json.dump({"error": message}, sys.stdout)
    sys.stdout.write("\n")
    sys.exit(code)


def pip(venv, args, pip_args):
    cmd = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    result = subprocess.run(cmd + pip_args + args, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        errors = [line.strip() for line in lines if line.lower().startswith("error:")] or lines[-1:]
        fail(f"pip install {' '.join(args)} failed: {' | '.join(errors[:3])}", 4)


def venv_jax_version(venv):
    """The jax the venv's python sees (None: none, or no venv yet); read from metadata, jax is not imported."""
    code = "import importlib.metadata as m\ntry:\n print(m.version('jax'))\nexcept m.PackageNotFoundError:\n pass"
    try:
        result = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code], capture_output=True, text=True)
    except OSError:
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def missing_packages(packages):
    """The packages dpkg does not have installed (removed ones with their config files left count as missing)."""
    try:
        result = subprocess.run(
            ["dpkg-query", "--show", "--showformat=${Package} ${Status}\\n", *packages], capture_output=True, text=True
        )
    except OSError:
        fail("apt_packages need a Debian or Ubuntu worker: there is no dpkg-query here")
    installed = {line.split()[0] for line in result.stdout.splitlines() if line.split()[-1:] == ["installed"]}
    return [p for p in packages if p not in installed]


def apt_get(argv, what):
    """Run apt-get (argv from tpuctl.remote); return its output's last line, or fail with apt's own error."""
    deadline = time.monotonic() + APT_LISTS_LOCK_WAIT_S
    while True:
        try:
            result = subprocess.run(argv, capture_output=True, text=True)
        except OSError as e:
            fail(f"apt-get {what} could not start: {e}")
        sys.stderr.write(result.stdout + result.stderr)
        if result.returncode == 0:
            return (result.stdout.strip().splitlines() or [""])[-1]
        errors = [line.strip() for line in result.stderr.splitlines() if line.startswith(("E:", "sudo:"))]
        if any("Could not get lock" in line for line in errors) and time.monotonic() < deadline:
            time.sleep(2)  # another apt (apt-daily on a fresh VM) holds the package lists: wait for it
            continue
        detail = " | ".join(errors[:3]) or f"exit {result.returncode}"
        if any(line.startswith("sudo:") for line in errors):
            detail += " (apt_packages need root: log in as root or give this user passwordless sudo)"
        fail(f"apt-get {what} failed: {detail}", 5)


def install_apt_packages(apt):
    """apt-get install the packages, as root or through `sudo -n`; update the package lists only when one is
    missing (it reaches the mirror from every worker; already-installed packages need no lists)."""
    if not apt["packages"]:
        return None
    sudo = []
    if os.geteuid() != 0:
        if shutil.which(apt["sudo"][0]) is None:
            fail("apt_packages need root: the login user is not root and this worker has no sudo", 5)
        sudo = apt["sudo"]
    missing = missing_packages(apt["packages"])
    if missing:
        apt_get(sudo + apt["update"], "update")
    summary = apt_get(sudo + apt["install"], "install " + " ".join(apt["packages"]))
    return {"packages": apt["packages"], "missing": missing, "updated": bool(missing), "summary": summary}


def main():
    args = json.loads(sys.argv[1])
    start = time.monotonic()
    project = os.path.abspath(os.path.expanduser(args["remote_dir"]))
    if not any(os.path.exists(os.path.join(project, f)) for f in METADATA_FILES):
        fail(f"{project} holds no Python project (no pyproject.toml): run `tpuctl sync` first")
    on_tpu = any(glob.glob(g) for g in args["device_globs"])
    requirements = args["requirements"]["tpu" if on_tpu else "other"]
    pip_args = args["pip_args"] + (args["tpu_pip_args"] if on_tpu else [])
    stamp = hashlib.sha256()
    for name in METADATA_FILES:
        path = os.path.join(project, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                stamp.update(name.encode() + b"\0" + f.read())
    what = [args["extras"], pip_args, sys.version, on_tpu, requirements, args["constraints"]]
    stamp.update(json.dumps([*what, sorted(set(args["apt"]["packages"]))]).encode())
    venv = os.path.join(project, ".venv")
    stamp_path = os.path.join(venv, ".tpuctl-prepared")
    try:
        with open(stamp_path) as f:
            unchanged = f.read().strip() == stamp.hexdigest()
    except OSError:
        unchanged = False
    jax = venv_jax_version(venv) if unchanged else None
    if jax not in (None, args["jax_version"]):
        unchanged = False  # someone installed another jax by hand since: back to the pinned one
    apt = None
    if not unchanged:
        apt = install_apt_packages(args["apt"])
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            result = subprocess.run([sys.executable, "-m", "venv", venv], stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:
                fail(f"creating {venv} failed: {result.stderr.strip()[-200:]} (install python3-venv)")
        # pip takes constraints from a file only; it stays in the venv as a record of the pin
        constraints = os.path.join(venv, ".tpuctl-constraints.txt")
        with open(constraints, "w") as f:
            f.write("".join(c + "\n" for c in args["constraints"]))
        target = project + (f"[{args['extras']}]" if args["extras"] else "")
        pip(venv, ["-e", target, *requirements, "-c", constraints], pip_args)
        jax = venv_jax_version(venv)
        with open(stamp_path, "w") as f:
            f.write(stamp.hexdigest() + "\n")
    json.dump(
        {
            "venv": venv,
            "changed": not unchanged,
            "tpu": on_tpu,
            "jax": jax,
            "apt": apt,
            "seconds": round(time.monotonic() - start, 2),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


main()
