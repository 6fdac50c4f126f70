"""tpuctl create / delete / describe against the local Cloud TPU API (the real google-cloud-tpu client over REST):
long-running operations, queued resources, capacity and quota refusals retried with backoff, mistakes in one line."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

import pytest
from standins import warm
from standins.pod import PROJECT, ZONE
from standins.tpu_api import ApiError, FakeTpuApi, OperationError

Tpuctl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def tpuctl(tpu_api: FakeTpuApi, tmp_path: Path) -> Tpuctl:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "TPUCTL_API_ENDPOINT": tpu_api.endpoint,
        "TPUCTL_PROJECT": PROJECT,
        "TPUCTL_ZONE": ZONE,
        "TPUCTL_API_TIMEOUT": "10",
        "TPUCTL_API_POLL": "0.05",
    }

    def run(*args: str, timeout: float = 60, **more_env: str) -> subprocess.CompletedProcess[str]:
        return warm.tpuctl(list(args), env=env | more_env, timeout=timeout)

    return run


def posts(api: FakeTpuApi) -> list:
    return api.creations()


def test_create_waits_until_ready_and_describe_shows_it(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.create_delay_s = 3.0  # long enough that tpuctl's first look sees CREATING even on a loaded machine
    r = tpuctl("create", "my-pod", "--type", "v4-32", "--spot", "--runtime", "tpu-ubuntu2204-base", "--json")
    assert r.returncode == 0, r.stderr
    node = json.loads(r.stdout)
    assert node["name"] == "my-pod" and node["state"] == "READY" and node["accelerator_type"] == "v4-32"
    assert node["spot"] is True and len(node["workers"]) == 4  # a v4-32 has 4 hosts
    assert "my-pod: CREATING" in r.stderr and "my-pod: READY, 4 workers" in r.stderr  # the progress, as it went
    (sent,) = posts(tpu_api)
    assert sent.query["nodeId"] == ["my-pod"]
    assert sent.body["acceleratorType"] == "v4-32" and sent.body["schedulingConfig"] == {"spot": True}
    assert sent.body["labels"] == {"created-by": "tpuctl"}
    # the operation was followed to its end through the operations endpoint
    assert any("/operations/" in r.path for r in tpu_api.requests)
    r = tpuctl("describe", "my-pod")
    assert r.returncode == 0, r.stderr
    for field in ("state", "READY", "accelerator", "v4-32", "capacity", "spot", "worker 3", "created-by=tpuctl"):
        assert field in r.stdout


def test_create_sends_the_service_account_tags_metadata_startup_script_and_disks(
    tpuctl: Tpuctl, tpu_api: FakeTpuApi, tmp_path: Path
):
    """What locked-down projects need of a new TPU, through the real client to the API; each bad value is one line
    before anything is sent."""
    script = tmp_path / "boot.sh"
    script.write_text("#!/bin/bash\nmount-bucket /mnt/data\n")
    account = "trainer@proj.iam.gserviceaccount.com"
    r = tpuctl(
        "create", "locked", "--type", "v4-8", "--service-account", account,
        "--scopes", "cloud-platform,https://www.googleapis.com/auth/devstorage.read_only", "--tags", "tpu,from-bastion",
        "--metadata", "owner=alice,team=vision", "--startup-script", str(script),
        "--data-disk", f"imagenet:ro,projects/{PROJECT}/zones/{ZONE}/disks/scratch", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (sent,) = posts(tpu_api)
    from google.cloud.tpu_v2 import AttachedDisk

    DiskMode = AttachedDisk.DiskMode  # the REST transport sends enums as their numbers
    scope = "https://www.googleapis.com/auth/"
    assert sent.body["serviceAccount"] == {
        "email": account,
        "scope": [scope + "cloud-platform", scope + "devstorage.read_only"],
    }
    assert sent.body["tags"] == ["tpu", "from-bastion"]
    # and tpuctl's own key (made now: this HOME had none), for the user it logs in as, so that the VMs accept it
    # from their first boot (ssh_keys = "auto", as gcloud does)
    key = tmp_path / ".ssh" / "google_compute_engine"
    public = " ".join(key.with_name("google_compute_engine.pub").read_text().split()[:2])
    assert public.startswith("ssh-ed25519 ") and key.stat().st_mode & 0o077 == 0
    user = getpass.getuser()
    assert sent.body["metadata"] == {
        "owner": "alice",
        "team": "vision",
        "startup-script": script.read_text(),
        "ssh-keys": f"{user}:{public} {user}",
    }
    assert sent.body["dataDisks"] == [
        {"sourceDisk": f"projects/{PROJECT}/zones/{ZONE}/disks/imagenet", "mode": DiskMode.READ_ONLY},
        {"sourceDisk": f"projects/{PROJECT}/zones/{ZONE}/disks/scratch", "mode": DiskMode.READ_WRITE},
    ]
    for flags, says in (
        (["--metadata", "owner"], "metadata 'owner' is not KEY=VALUE"),
        (["--tags", "Not_A_Tag"], "tag 'Not_A_Tag' is not a network tag"),
        (["--startup-script", str(tmp_path / "missing.sh")], "cannot read the startup script"),
        (["--data-disk", "imagenet:rx"], "data disk 'imagenet:rx' is not NAME or NAME:ro"),
    ):
        r = tpuctl("create", "bad", "--type", "v4-8", *flags)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert len(posts(tpu_api)) == 1  # none of them reached the API


def test_dry_run_prints_the_request_and_sends_nothing(tpuctl: Tpuctl, tpu_api: FakeTpuApi, tmp_path: Path):
    r = tpuctl("create", "my-pod", "--type", "v5litepod-16", "--reservation", "--network", "vpc-1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"POST {tpu_api.endpoint}/v2/projects/{PROJECT}/locations/{ZONE}/nodes?nodeId=my-pod" in r.stdout
    body = json.loads(r.stdout.split("\n", 1)[1])
    assert body["acceleratorType"] == "v5litepod-16" and body["schedulingConfig"] == {"reserved": True}
    assert body["networkConfig"]["network"] == "vpc-1"
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--queued", "--valid-until", "6h", "--dry-run", "--json")
    sent = json.loads(r.stdout)
    assert sent["path"].endswith("/queuedResources?queuedResourceId=my-pod")
    assert sent["body"]["queueingPolicy"] == {"validUntilDuration": "21600s"}
    assert sent["body"]["tpu"]["nodeSpec"][0]["nodeId"] == "my-pod"
    assert posts(tpu_api) == []
    # a dry run makes no key: the request shows where it would be made
    key = tmp_path / ".ssh" / "google_compute_engine"
    user = getpass.getuser()
    metadata = sent["body"]["tpu"]["nodeSpec"][0]["node"]["metadata"]
    assert metadata == {"ssh-keys": f"{user}:ssh-ed25519 KEY-TO-BE-MADE-AT:{key} {user}"} and not key.exists()


def test_the_runtime_is_the_one_google_documents_for_the_type_unless_given(tpuctl: Tpuctl):
    """cloud.google.com/tpu/docs/runtimes: v6e, v5p and v5e each have their own image; v4 and older share one."""
    documented = {
        "v6e-8": "v2-alpha-tpuv6e",
        "v5p-16": "v2-alpha-tpuv5",
        "v5litepod-16": "v2-alpha-tpuv5-lite",
        "v4-32": "tpu-ubuntu2204-base",
        "v3-8": "tpu-ubuntu2204-base",
    }
    for kind, runtime in documented.items():
        r = tpuctl("create", "my-pod", "--type", kind, "--dry-run", "--json")
        assert json.loads(r.stdout)["body"]["runtimeVersion"] == runtime, kind
    r = tpuctl("create", "my-pod", "--type", "v5litepod-16", "--runtime", "my-image", "--dry-run", "--json")
    assert json.loads(r.stdout)["body"]["runtimeVersion"] == "my-image"


def test_the_key_in_a_new_tpus_metadata_is_kept_off_or_merged_as_the_settings_say(
    tpuctl: Tpuctl, tpu_api: FakeTpuApi, tmp_path: Path
):
    # ssh_keys = "off": no key made, none in the metadata
    r = tpuctl("create", "plain", "--type", "v4-8", "--json", TPUCTL_SSH_KEYS="off")
    assert r.returncode == 0, r.stderr
    assert "metadata" not in posts(tpu_api)[0].body and not (tmp_path / ".ssh").exists()
    # an existing key (an RSA one, with its .pub) is used as it is, never replaced; ssh-keys lines given in the
    # metadata setting stay, ours after them
    key = tmp_path / "mykey"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(key)], check=True)
    before = key.read_bytes()
    public = " ".join(key.with_name("mykey.pub").read_text().split()[:2])
    alice = "alice:ssh-ed25519 AAAAalice alice"
    r = tpuctl(
        "create", "keyed", "--type", "v4-8", "--metadata", f"ssh-keys={alice}", "--ssh-user", "jane",
        "--ssh-key", str(key), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert posts(tpu_api)[1].body["metadata"] == {"ssh-keys": f"{alice}\njane:{public} jane"}
    assert key.read_bytes() == before
    r = tpuctl("create", "bad", "--type", "v4-8", TPUCTL_SSH_KEYS="maybe")
    assert r.returncode == 2 and "ssh_keys = 'maybe' is not one of auto, metadata, oslogin, off" in r.stderr, r.stderr


def test_no_capacity_and_no_quota_are_retried_with_backoff_until_it_works(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.fail_creates = [
        ApiError(HTTPStatus.TOO_MANY_REQUESTS, "Quota 'TPUV4sPerProjectPerZone' exceeded. Limit: 32"),
        OperationError(8, 'There is no more capacity in the zone "zone-a"; try again later'),
    ]
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--backoff", "0.2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "READY"
    assert len(posts(tpu_api)) == 3  # quota refused at once, capacity refused in the operation, then created
    lines = [line for line in r.stderr.splitlines() if "failed" in line]
    assert "attempt 1/10" in lines[0] and "Quota 'TPUV4sPerProjectPerZone' exceeded" in lines[0]
    assert "attempt 2/10" in lines[1] and "no more capacity" in lines[1]
    waits = [float(line.rsplit("again in ", 1)[1].split()[0]) for line in lines]
    assert len(waits) == 2


def test_giving_up_after_the_attempts_says_what_to_try(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.fail_creates = [OperationError(8, "There is no more capacity in the zone")] * 3
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--attempts", "3", "--backoff", "0")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tpuctl: error: creating TPU 'my-pod': no capacity or quota now")
    assert "gave up after 3 attempts" in last and "--queued" in last
    assert len(posts(tpu_api)) == 3 and ("proj", "zone-a", "my-pod") not in tpu_api.nodes


def test_zones_are_tried_in_order_and_the_tpu_lands_in_the_first_with_room(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    """--zones: a zone out of quota (refused at once) or out of capacity (its operation fails) hands the request to
    the next; the TPU lands in the first that has room, and tpuctl says where."""
    tpu_api.full_zones = {
        "zone-a": ApiError(HTTPStatus.TOO_MANY_REQUESTS, "Quota 'TPUV4sPerProjectPerZone' exceeded. Limit: 32"),
        "zone-b": OperationError(8, 'There is no more capacity in the zone "zone-b"; try again later'),
    }
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--zones", "zone-a,zone-b,zone-c", "--backoff", "0", "--json")
    assert r.returncode == 0, r.stderr
    node = json.loads(r.stdout)
    assert node["zone"] == "zone-c" and node["state"] == "READY"
    assert [s.path.split("/")[5] for s in posts(tpu_api)] == ["zone-a", "zone-b", "zone-c"]  # one pass, in order
    assert "zone-a refused (creating TPU 'my-pod': no capacity or quota now (Quota 'TPUV4sPerProject" in r.stderr
    assert "; trying zone-b" in r.stderr and "; trying zone-c" in r.stderr and "got zone zone-c" in r.stderr
    assert "give the other commands --zone zone-c" in r.stderr
    assert [key for key in tpu_api.nodes if key[2] == "my-pod"] == [(PROJECT, "zone-c", "my-pod")]
    assert "attempt" not in r.stderr  # no backoff wait: a zone had room in the first pass


def test_when_every_zone_refuses_the_passes_back_off_then_give_up(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    full = OperationError(8, "There is no more capacity in the zone")
    tpu_api.full_zones = {"zone-a": full, "zone-b": full}
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--zones", "zone-a,zone-b", "--attempts", "2", "--backoff", "0")
    assert r.returncode == 2
    assert "attempt 1/2 every zone refused (zone-a, zone-b); again in" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "every zone refused (zone-a, zone-b); gave up after 2 attempts" in last and "--zones" in last
    assert [s.path.split("/")[5] for s in posts(tpu_api)] == ["zone-a", "zone-b"] * 2
    assert not [key for key in tpu_api.nodes if key[2] == "my-pod"]
    # bad zones, and zonal disks across zones: one line each, nothing sent
    for flags, says in (
        (["--zones", "zone-a,Zone B"], "zone 'Zone B' is not a zone name"),
        (["--zones", "zone-a,zone-b", "--data-disk", "imagenet"], "a persistent disk lives in one zone"),
    ):
        r = tpuctl("create", "bad", "--type", "v4-8", *flags)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert len(posts(tpu_api)) == 4


def test_mistakes_are_one_line_and_not_retried(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    r = tpuctl("create", "my-pod", "--type", "v9-99", "--backoff", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "tpuctl: error: creating TPU 'my-pod': the Cloud TPU API refused the request: "
        "Invalid accelerator type: 'v9-99' is not supported"
    )
    assert len(posts(tpu_api)) == 1
    tpu_api.add_node(PROJECT, ZONE, "taken", [("10.0.0.2", None)])
    r = tpuctl("create", "taken", "--type", "v4-8")
    assert r.returncode == 2 and "it already exists" in r.stderr and "tpuctl delete" in r.stderr
    r = tpuctl("create", "my-pod")
    assert r.returncode == 2 and "accelerator_type is not set" in r.stderr and "--type" in r.stderr
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--valid-until", "6h")
    assert r.returncode == 2 and "--valid-until is for queued resources" in r.stderr
    r = tpuctl("create", "my-pod", "--type", "v4-8", "--queued", "--valid-until", "soon")
    assert r.returncode == 2 and "--valid-until 'soon' is not a duration" in r.stderr


def test_queued_creation_then_delete_takes_the_queued_resource_with_it(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    r = tpuctl("create", "qpod", "--type", "v4-16", "--queued", "--spot", "--valid-until", "2h", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "READY"
    queued = tpu_api.queued[(PROJECT, ZONE, "qpod")]
    assert queued["spot"] == {} and queued["queueingPolicy"] == {"validUntilDuration": "7200s"}
    assert tpu_api.nodes[(PROJECT, ZONE, "qpod")]["queuedResource"] == queued["name"]  # as the API links them
    r = tpuctl("describe", "qpod", "--json")
    assert json.loads(r.stdout)["queued_resource"] == "qpod"
    assert json.loads(r.stdout)["queued_resource_state"] == "ACTIVE"
    r = tpuctl("delete", "qpod", "--yes")
    assert r.returncode == 0, r.stderr
    assert "qpod: deleted" in r.stderr
    assert (PROJECT, ZONE, "qpod") not in tpu_api.nodes and (PROJECT, ZONE, "qpod") not in tpu_api.queued


def test_a_failed_queue_is_cleaned_up_and_queued_again(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.fail_creates = [OperationError(8, "no capacity for spot v4-16")]
    r = tpuctl("create", "qpod", "--type", "v4-16", "--queued", "--backoff", "0")
    assert r.returncode == 0, r.stderr
    assert "attempt 1/10 failed" in r.stderr
    assert [p.path.rsplit("/", 1)[1] for p in posts(tpu_api)] == ["queuedResources", "queuedResources"]
    assert tpu_api.nodes[(PROJECT, ZONE, "qpod")]["state"] == "READY"


def test_delete_asks_for_the_name_unless_yes(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.add_node(PROJECT, ZONE, "pod", [("10.0.0.2", None)])
    r = tpuctl("delete", "pod")  # no terminal to ask on
    assert r.returncode == 2 and "refusing to delete TPU 'pod' without confirmation" in r.stderr
    assert (PROJECT, ZONE, "pod") in tpu_api.nodes
    r = tpuctl("delete", "pod", "--dry-run")
    assert r.returncode == 0 and "would delete TPU 'pod' (v4-32, READY)" in r.stdout
    r = tpuctl("delete", "gone-pod", "--yes")
    assert r.returncode == 2 and "TPU 'gone-pod' not found" in r.stderr and "TPUs there: pod" in r.stderr
    r = tpuctl("delete", "pod", "--yes")
    assert r.returncode == 0, r.stderr
    assert (PROJECT, ZONE, "pod") not in tpu_api.nodes


def test_backoff_grows_to_its_cap_with_jitter_below_each_step():
    import random

    from tpuctl.lifecycle import Backoff

    delays = Backoff(initial=30, maximum=600, factor=2, jitter=0.5).delays(random.Random(0))
    steps = [30, 60, 120, 240, 480, 600, 600]
    got = [next(delays) for _ in steps]
    assert all(step / 2 <= d <= step for d, step in zip(got, steps, strict=True)), got
    assert len(set(got)) == len(got)  # jittered: clients that failed together do not retry together


@pytest.mark.parametrize("queued", [False, True])
def test_an_operation_of_a_type_the_client_does_not_know_is_watched_through_the_tpu(
    tpuctl: Tpuctl, tpu_api: FakeTpuApi, queued: bool
):
    """A newer API's operation metadata (a type google-cloud-tpu has no descriptor for) cannot be parsed: create and
    delete go on by watching the node (or queued resource) itself, instead of ending in a ParseError."""
    tpu_api.operation_metadata_type = "type.googleapis.com/google.cloud.tpu.v3.OperationMetadataFromTheFuture"
    tpu_api.beyond_reference = True  # (the schema check at the end would rightly refuse it otherwise)
    r = tpuctl("create", "new-pod", "--type", "v4-8", *(["--queued"] if queued else []), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "READY"
    assert "an operation this client cannot read" in r.stderr and "OperationMetadataFromTheFuture" in r.stderr
    r = tpuctl("delete", "new-pod", "--yes")
    assert r.returncode == 0, r.stderr
    assert "new-pod: deleted" in r.stderr
    assert (PROJECT, ZONE, "new-pod") not in tpu_api.nodes


def test_a_queued_request_that_waits_is_listed_described_and_cancelled_by_its_name(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    """WAITING_FOR_RESOURCES, with no node, for hours: giving up the wait leaves it in the queue (said, with how to
    cancel it), `list` shows it beside the TPUs, `describe` and `delete` find it by its own name."""
    tpu_api.queue_wait_s = 3600
    tpu_api.add_node(PROJECT, ZONE, "other", [("10.0.0.2", None)])
    r = tpuctl("create", "q", "--type", "v4-8", "--queued", "--valid-until", "6h", "--ready-timeout", "1")
    assert r.returncode == 2 and "q: queued: WAITING_FOR_RESOURCES" in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "its queued resource is still WAITING_FOR_RESOURCES and may yet provision (and bill)" in last
    assert "`tpuctl delete q` cancels it" in last and "--cancel-on-timeout" in last
    assert (PROJECT, ZONE, "q") in tpu_api.queued and (PROJECT, ZONE, "q") not in tpu_api.nodes
    r = tpuctl("list")
    assert r.returncode == 0, r.stderr
    assert "other" in r.stdout and "queued resources with no node yet" in r.stdout
    (row,) = [line for line in r.stdout.splitlines() if line.startswith("q ")]
    assert "WAITING_FOR_RESOURCES" in row and "v4-8" in row and "21600s after creation" in row
    assert re.search(r"\s\d+s\s", row), row  # queued for a few seconds
    listed = json.loads(tpuctl("list", "--json").stdout)
    assert [(e["name"], e["kind"], e["state"]) for e in listed] == [
        ("other", "node", "READY"),
        ("q", "queued_resource", "WAITING_FOR_RESOURCES"),
    ]
    r = tpuctl("describe", "q")
    assert r.returncode == 0 and "queued resource (no node yet)" in r.stdout and "`tpuctl delete q`" in r.stderr
    assert json.loads(tpuctl("describe", "q", "--json").stdout)["node_id"] == "q"
    r = tpuctl("delete", "q", "--yes")
    assert r.returncode == 0 and "q: deleted" in r.stderr, r.stderr
    assert (PROJECT, ZONE, "q") not in tpu_api.queued
    r = tpuctl("describe", "q")  # gone: the usual one line naming what is there
    assert r.returncode == 2 and "TPU 'q' not found" in r.stderr and "other" in r.stderr


def test_cancel_on_timeout_takes_a_still_waiting_request_out_of_the_queue(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.queue_wait_s = 3600
    r = tpuctl("create", "q", "--type", "v4-8", "--queued", "--ready-timeout", "1", "--cancel-on-timeout")
    assert r.returncode == 2 and "(still queued: WAITING_FOR_RESOURCES); request cancelled" in r.stderr, r.stderr
    assert (PROJECT, ZONE, "q") not in tpu_api.queued
    r = tpuctl("create", "q", "--type", "v4-8", "--cancel-on-timeout")
    assert r.returncode == 2 and "--cancel-on-timeout is for queued resources" in r.stderr


def test_a_queue_waits_then_provisions_or_fails_with_the_apis_reason(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.queue_wait_s = 1.0
    r = tpuctl("create", "q", "--type", "v4-8", "--queued", "--json")
    assert r.returncode == 0, r.stderr
    assert "q: queued: WAITING_FOR_RESOURCES" in r.stderr and json.loads(r.stdout)["queued_resource"] == "q"
    tpu_api.fail_creates = [ApiError(HTTPStatus.TOO_MANY_REQUESTS, "Quota 'TPUV4sPodPerProjectPerZone' exceeded")]
    r = tpuctl("create", "q2", "--type", "v4-8", "--queued", "--attempts", "1")
    assert r.returncode == 2, r.stderr
    assert "its queued resource is FAILED: Quota 'TPUV4sPodPerProjectPerZone' exceeded (code 8)" in r.stderr
    assert (PROJECT, ZONE, "q2") not in tpu_api.queued  # the failed request is cleaned up, not left to hold the name


def test_an_operation_error_whose_details_the_client_does_not_know_is_not_a_crash(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    """The creation fails in its operation, with a detail of a type the client has no descriptor for: the operation
    cannot be read, so tpuctl watches for the node, and says so when it never comes."""
    detail = {"@type": "type.googleapis.com/google.cloud.tpu.v3.CapacityHint", "zone": ZONE}
    tpu_api.beyond_reference = True  # (as above)
    tpu_api.fail_creates = [OperationError(8, "There is no more capacity in the zone", (detail,))]
    r = tpuctl("create", "new-pod", "--type", "v4-8", "--attempts", "1", "--ready-timeout", "2")
    assert r.returncode == 2, r.stderr
    assert "an operation this client cannot read" in r.stderr and "CapacityHint" in r.stderr
    assert "not READY after 2 s (still requested)" in r.stderr and "internal error" not in r.stderr


def test_how_long_a_request_has_queued_reads_at_a_glance():
    import datetime

    from tpuctl.render import since

    now = datetime.datetime(2026, 12, 6, 4, 12, 30, tzinfo=datetime.timezone.utc)
    assert since("2026-12-06T01:00:00Z", now) == "3h 12m"
    assert since("2026-12-04T00:00:00+00:00", now) == "2d 4h"
    assert since("2026-12-06T04:12:00.123456Z", now) == "29s" and since("", now) == "-"


def test_a_suspended_request_is_listed_described_and_deleted_by_its_name(tpuctl: Tpuctl, tpu_api: FakeTpuApi):
    tpu_api.queue_wait_s = 3600
    assert tpuctl("create", "q", "--type", "v4-8", "--queued", "--no-wait").returncode == 0
    tpu_api.queued[(PROJECT, ZONE, "q")]["state"] = {"state": "SUSPENDED", "stateInitiator": "SERVICE"}
    (row,) = [line for line in tpuctl("list").stdout.splitlines() if line.startswith("q ")]
    assert "SUSPENDED" in row
    r = tpuctl("describe", "q", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "SUSPENDED", r.stderr
    r = tpuctl("delete", "q", "--yes")
    assert r.returncode == 0 and (PROJECT, ZONE, "q") not in tpu_api.queued, r.stderr
