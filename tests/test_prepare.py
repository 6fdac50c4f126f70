"""tpuctl prepare: a real virtualenv with the synced project, made on every worker, idempotently.

The workers here cannot reach PyPI, so the project prepared is a small one without dependencies, installed with
--no-index (the same pip install -e path that installs the trainer's `train` extra on a pod). It is a setup.py
project because the workers' venv has setuptools but not `wheel`, which a PEP 660 editable build needs offline.
"""

from __future__ import annotations

import json

import pytest

PIP_ARGS = "--no-index --no-build-isolation"


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


def test_prepare_dry_run_prints_the_remote_command(pod):
    r = pod.tpuctl("prepare", "--dry-run")
    assert r.returncode == 0
    assert r.stdout.startswith("python3 -c ") and '"remote_dir": "~/tpuctl"' in r.stdout
