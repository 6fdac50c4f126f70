"""Runs ON A WORKER, sent by tpuctl.remote.prepare_command: make REMOTE_DIR/.venv with the project installed.

Stdlib only, Python 3.8+. Idempotent: a stamp in the venv records what was installed (project metadata, extras,
pip arguments, Python, TPU or not); when nothing changed it returns at once. The project is installed editable,
so code synced later needs no reinstall. Prints one JSON document on stdout; pip's output goes to stderr.
"""

import glob
import hashlib
import json
import os
import subprocess
import sys
import time

METADATA_FILES = ("pyproject.toml", "setup.py", "setup.cfg")


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


def main():
    args = json.loads(sys.argv[1])
    start = time.monotonic()
    project = os.path.abspath(os.path.expanduser(args["remote_dir"]))
    if not any(os.path.exists(os.path.join(project, f)) for f in METADATA_FILES):
        fail(f"{project} holds no Python project (no pyproject.toml): run `tpuctl sync` first")
    on_tpu = any(glob.glob(g) for g in args["device_globs"])
    stamp = hashlib.sha256()
    for name in METADATA_FILES:
        path = os.path.join(project, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                stamp.update(name.encode() + b"\0" + f.read())
    stamp.update(json.dumps([args["extras"], args["pip_args"], sys.version, on_tpu]).encode())
    venv = os.path.join(project, ".venv")
    stamp_path = os.path.join(venv, ".tpuctl-prepared")
    try:
        with open(stamp_path) as f:
            unchanged = f.read().strip() == stamp.hexdigest()
    except OSError:
        unchanged = False
    if not unchanged:
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            result = subprocess.run([sys.executable, "-m", "venv", venv], stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:
                fail(f"creating {venv} failed: {result.stderr.strip()[-200:]} (install python3-venv)")
        target = project + (f"[{args['extras']}]" if args["extras"] else "")
        pip(venv, ["-e", target], args["pip_args"])
        if on_tpu:
            pip(venv, ["jax[tpu]"], args["pip_args"])
        with open(stamp_path, "w") as f:
            f.write(stamp.hexdigest() + "\n")
    json.dump(
        {
            "venv": venv,
            "changed": not unchanged,
            "tpu": on_tpu,
            "seconds": round(time.monotonic() - start, 2),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


main()
