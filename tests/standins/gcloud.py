#!/usr/bin/env python3
"""A stand-in `gcloud` for the README's first steps (test_first_steps), on PATH as `gcloud`: the four commands those
steps name, each doing to the stand-in project what the real one does to a real project, and nothing else (any
other command exits 2 naming itself, so a README that starts naming another fails that test).

- `auth application-default login`: nothing (the local APIs take no credentials: tpuctl sends none to an http://
  endpoint);
- `config set project P`: writes core/project into $CLOUDSDK_CONFIG/configurations/config_default, the file tpuctl
  reads gcloud's settings from;
- `services enable tpu.googleapis.com`: records the service enabled for the project in
  $CLOUDSDK_CONFIG/stand-in-enabled-services, which the test's local Cloud TPU API reads (until then it answers as
  the real API does in a project that has not enabled it);
- `storage buckets create gs://B --location L`: creates the bucket in the GCS emulator (STORAGE_EMULATOR_HOST).
"""

from __future__ import annotations

import configparser
import json
import os
import sys
import urllib.request
from pathlib import Path

ENABLED_SERVICES = "stand-in-enabled-services"


def config_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("CLOUDSDK_CONFIG", "~/.config/gcloud")))


def config_file() -> Path:
    return config_dir() / "configurations" / "config_default"


def project() -> str:
    parser = configparser.ConfigParser()
    parser.read(config_file())
    return parser.get("core", "project", fallback="")


def set_project(name: str) -> None:
    parser = configparser.ConfigParser()
    parser.read(config_file())
    if not parser.has_section("core"):
        parser.add_section("core")
    parser.set("core", "project", name)
    config_file().parent.mkdir(parents=True, exist_ok=True)
    with config_file().open("w") as f:
        parser.write(f)
    print("Updated property [core/project].", file=sys.stderr)


def enable(service: str) -> None:
    if not project():
        sys.exit("ERROR: (gcloud.services.enable) no project: gcloud config set project PROJECT")
    with (config_dir() / ENABLED_SERVICES).open("a") as f:
        f.write(f"{project()} {service}\n")
    print(f"Operation finished successfully: {service} enabled for {project()}", file=sys.stderr)


def create_bucket(url: str, location: str) -> None:
    name = url.removeprefix("gs://").rstrip("/")
    body = json.dumps({"name": name, "location": location}).encode()
    endpoint = os.environ["STORAGE_EMULATOR_HOST"]
    request = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project={project()}", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    print(f"Creating {url}/...", file=sys.stderr)


def main(argv: list[str]) -> int:
    match argv:
        case ["auth", "application-default", "login"]:
            print("(stand-in) the local APIs take no credentials", file=sys.stderr)
        case ["config", "set", "project", name]:
            set_project(name)
        case ["services", "enable", service]:
            enable(service)
        case ["storage", "buckets", "create", url, "--location", location]:
            create_bucket(url, location)
        case _:
            print(f"stand-in gcloud: no stand-in for `gcloud {' '.join(argv)}`", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
