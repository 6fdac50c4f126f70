"""Where settings come from: flags > TPUCTL_* env > profile > gcloud config files > defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from standins import warm

from tpuctl import config
from tpuctl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path):
    """An environment with a config file and a gcloud config dir of the test's own."""
    gcloud = tmp_path / "gcloud"
    (gcloud / "configurations").mkdir(parents=True)
    (gcloud / "active_config").write_text("work\n")
    (gcloud / "configurations" / "config_work").write_text(
        "[core]\nproject = gcloud-proj\naccount = me@example.com\n\n[compute]\nzone = europe-west4-a\n"
    )
    return {
        "CLOUDSDK_CONFIG": str(gcloud),
        "TPUCTL_CONFIG": str(tmp_path / "tpuctl.toml"),
        "HOME": str(tmp_path),
    }


def write_profiles(env, text):
    Path(env["TPUCTL_CONFIG"]).write_text(text)


def test_gcloud_config_is_the_last_resort(env):
    s = config.resolve(env=env)
    assert (s.project, s.zone) == ("gcloud-proj", "europe-west4-a")
    assert s.sources["project"] == "gcloud config work"
    assert s.ssh_port == 22 and s.sources["ssh_port"] == "default"


def test_precedence_flag_env_profile_gcloud(env):
    profile = (
        'project = "prof-proj"\nzone = "us-central2-b"\ntpu = "v4-pod"\nssh_port = 2222\ndevice_globs = ["/dev/x*"]\n'
    )
    write_profiles(env, f'default_profile = "pod"\n[profiles.pod]\n{profile}')
    s = config.resolve(env=env)
    assert (s.project, s.zone, s.tpu, s.ssh_port, s.device_globs) == (
        "prof-proj", "us-central2-b", "v4-pod", 2222, ["/dev/x*"]
    )  # fmt: skip
    assert s.sources["tpu"] == f"profile pod ({env['TPUCTL_CONFIG']})"
    env = {**env, "TPUCTL_ZONE": "us-east5-a", "TPUCTL_SSH_PORT": "2200", "TPUCTL_INTERNAL_IP": "yes"}
    s = config.resolve(env=env)
    assert (s.project, s.zone, s.ssh_port, s.internal_ip) == ("prof-proj", "us-east5-a", 2200, True)
    assert s.sources["zone"] == "env TPUCTL_ZONE"
    s = config.resolve({"zone": "asia-a", "ssh_port": 22, "tpu": None}, env=env)
    assert (s.zone, s.ssh_port, s.tpu) == ("asia-a", 22, "v4-pod")
    assert s.sources["zone"] == "flag --zone"


def test_profile_selection_by_name_and_env(env):
    write_profiles(env, '[profiles.default]\ntpu = "a"\n[profiles.other]\ntpu = "b"\n')
    assert config.resolve(env=env).tpu == "a"
    assert config.resolve(env=env, profile="other").tpu == "b"
    assert config.resolve(env={**env, "TPUCTL_PROFILE": "other"}).tpu == "b"
    with pytest.raises(ConfigError, match=r"profile 'nope' is not in .*profiles there: default, other"):
        config.resolve(env=env, profile="nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[profiles.default]\nzonee = "x"\n', "unknown setting 'zonee' in profile 'default'"),
        (
            '[profiles.default]\nssh_port = "abc"\n',
            "ssh_port from profile default .* is 'abc', expected a int",
        ),
        ("[profiles.default]\nconcurrency = 0\n", "concurrency = 0 .* must be at least 1"),
        ("[profiles.default\n", "cannot read"),
        ('projects = "x"\n', "unknown key 'projects'"),
    ],
)
def test_bad_config_files_name_the_key(env, text, message):
    write_profiles(env, text)
    with pytest.raises(ConfigError, match=message):
        config.resolve(env=env)


def test_bad_env_values_name_the_variable(env):
    with pytest.raises(ConfigError, match="ssh_port from env TPUCTL_SSH_PORT is 'twenty'"):
        config.resolve(env={**env, "TPUCTL_SSH_PORT": "twenty"})
    with pytest.raises(ConfigError, match="internal_ip from env TPUCTL_INTERNAL_IP is 'maybe'"):
        config.resolve(env={**env, "TPUCTL_INTERNAL_IP": "maybe"})


def test_missing_setting_says_every_way_to_set_it(env):
    env["CLOUDSDK_CONFIG"] = env["HOME"] + "/no-gcloud"
    s = config.resolve(env=env)
    with pytest.raises(ConfigError) as e:
        s.require("project")
    assert str(e.value) == (
        "project is not set (set it with --project, TPUCTL_PROJECT, 'project = ...' in a profile of "
        "~/.config/tpuctl/config.toml or `gcloud config set core/project ...`)"
    )
    with pytest.raises(ConfigError) as e:  # every missing one at once, each with its ways
        s.require("project", "zone", "tpu")
    assert e.value.message == "project, zone and tpu are not set"
    assert e.value.hint is not None
    assert all(f"{n}: set it with --{n}, TPUCTL_{n.upper()}" in e.value.hint for n in ("project", "zone", "tpu"))
    s.require("remote_dir")  # set (a default): nothing to say


def test_jax_version_defaults_to_the_jax_installed_here(env):
    s = config.resolve(env=env)
    assert (s.jax_version, s.sources["jax_version"]) == (metadata.version("jax"), "default")
    write_profiles(env, '[profiles.default]\njax_version = "0.4.35"\napt_packages = ["libgl1", "ffmpeg"]\n')
    s = config.resolve(env=env)
    assert (s.jax_version, s.apt_packages) == ("0.4.35", ["libgl1", "ffmpeg"])
    s = config.resolve({"jax_version": "0.5.0rc1"}, env={**env, "TPUCTL_APT_PACKAGES": "tmux, rsync"})
    assert (s.jax_version, s.apt_packages) == ("0.5.0rc1", ["tmux", "rsync"])
    assert s.sources["apt_packages"] == "env TPUCTL_APT_PACKAGES"
    # where jax is not installed there is no default: read without importing anything but the standard library
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tpuctl import config; print(config.local_jax_version())"
    )
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout == "None\n"


@pytest.mark.parametrize("bad", ["latest", ">=0.4.30", "0.4.35; rm -rf /", "jax==0.4.35"])
def test_a_jax_version_that_is_not_a_release_is_one_line(env, bad):
    r = run({**env, "TPUCTL_JAX_VERSION": bad}, "config", "show")
    assert r.returncode == 2
    assert r.stderr == (
        f"tpuctl: error: jax_version = {bad!r} (from env TPUCTL_JAX_VERSION) is not a JAX release"
        " (give one version, e.g. 0.4.35, without == or >=)\n"
    )


def run(env, *args):
    full = {**os.environ, **env}
    return warm.tpuctl(list(args), env=full, timeout=30)


def test_config_show_json_and_table(env):
    r = run({**env, "TPUCTL_TPU": "pod-1"}, "config", "show", "--json", "--zone", "z-flag")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["zone"] == {"value": "z-flag", "source": "flag --zone"}
    assert data["tpu"] == {"value": "pod-1", "source": "env TPUCTL_TPU"}
    assert data["project"] == {"value": "gcloud-proj", "source": "gcloud config work"}
    table = run(env, "config", "show")
    assert table.returncode == 0
    assert any(line.split()[:2] == ["zone", "europe-west4-a"] for line in table.stdout.splitlines())


def test_zone_not_set_is_one_line_with_the_fix(env):
    env["CLOUDSDK_CONFIG"] = env["HOME"] + "/no-gcloud"
    r = run(env, "list", "--project", "p")
    assert r.returncode == 2
    assert r.stderr.startswith("tpuctl: error: zone is not set (set it with --zone, TPUCTL_ZONE")
    assert r.stderr.count("\n") == 1


def test_help_names_the_env_var_of_each_flag(env):
    r = run(env, "check", "--help")
    assert r.returncode == 0
    for var in (
        "TPUCTL_PROJECT",
        "TPUCTL_ZONE",
        "TPUCTL_TPU",
        "TPUCTL_SSH_USER",
        "TPUCTL_SSH_KEY",
        "TPUCTL_SSH_PORT",
    ):
        assert var in r.stdout


def test_tpuctl_never_imports_jax_tensorflow_or_the_cloud_client_to_start():
    code = (
        "import sys; from tpuctl.cli import cli\n"
        "try:\n    cli.main(['check', '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow', 'flax', 'grpc', 'paramiko')"
        " or m.startswith('google.cloud')]\nprint(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_a_fleet_command_names_every_missing_setting_in_one_try(env):
    env["CLOUDSDK_CONFIG"] = env["HOME"] + "/no-gcloud"
    r = run(env, "check")
    assert r.returncode == 2
    assert r.stderr.startswith("tpuctl: error: project, zone and tpu are not set (project: set it with --project")
    assert r.stderr.count("\n") == 1


def test_the_project_lookup_imports_one_compute_service_and_leaves_the_package_whole():
    """tpuctl.compute imports Compute Engine's projects service past the package's __init__ (which imports all ~100
    services); a later plain import of the package still gets all of it."""
    code = (
        "import sys\nfrom tpuctl.imports import import_past_init\n"
        "m = import_past_init('google.cloud.compute_v1', 'services.projects')\n"
        "print(hasattr(m, 'ProjectsClient'), 'google.cloud.compute_v1.services.instances' in sys.modules)\n"
        "import google.cloud.compute_v1 as c\nprint(hasattr(c, 'InstancesClient'), hasattr(c, 'ProjectsClient'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["True", "False", "True", "True"]
