"""tpuctl list and API failures: the real google-cloud-tpu client against the local Cloud TPU API."""

from __future__ import annotations

import json
import socket
import time
from http import HTTPStatus

import pytest


def test_list_shows_every_node_of_the_zone(pod):
    workers = [("10.0.0.5", None), ("10.0.0.6", None)]
    pod.api.add_node("proj", "zone-a", "other", workers, accelerator_type="v5p-16", state="CREATING", health="")
    pod.api.add_node("proj", "zone-b", "elsewhere", [("10.1.0.1", "1.2.3.4")])
    r = pod.tpuctl("list", "--json")
    assert r.returncode == 0, r.stderr
    nodes = {n["name"]: n for n in json.loads(r.stdout)}
    assert set(nodes) == {"pod", "other"}
    assert nodes["pod"]["state"] == "READY" and nodes["pod"]["health"] == "HEALTHY"
    assert [w["external_ip"] for w in nodes["pod"]["workers"]] == pod.fleet.ips
    assert nodes["other"]["accelerator_type"] == "v5p-16" and nodes["other"]["state"] == "CREATING"
    assert [w["internal_ip"] for w in nodes["other"]["workers"]] == ["10.0.0.5", "10.0.0.6"]
    table = pod.tpuctl("list", "--internal-ip")
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("other"))
    assert row.split()[:5] == ["other", "CREATING", "-", "v5p-16", "2"] and "10.0.0.5, 10.0.0.6" in row


def test_list_pages_through_many_nodes(pod):
    for i in range(120):
        pod.api.add_node("proj", "zone-a", f"n{i:03d}", [(f"10.0.1.{i}", None)])
    pod.api.page_size = 50  # the server's page, not the client's: tpuctl must follow nextPageToken
    r = pod.tpuctl("list", "--json")
    assert r.returncode == 0
    assert sorted(n["name"] for n in json.loads(r.stdout)) == sorted(["pod", *(f"n{i:03d}" for i in range(120))])
    pages = [q.query.get("pageToken") for q in pod.api.requests if q.method == "GET" and q.path.endswith("/nodes")]
    assert pages == [None, ["50"], ["100"]]


def test_a_state_newer_than_the_client_is_shown_not_crashed_on(pod):
    """The REST client asks for enums as numbers; one the installed client does not know arrives as a plain int."""
    node = pod.api.nodes[("proj", "zone-a", "pod")]
    node["state"], node["health"] = 17, 42
    pod.api.beyond_reference = True  # (the schema check at the end would rightly refuse them otherwise)
    r = pod.tpuctl("list", "--json")
    assert r.returncode == 0, r.stderr
    (listed,) = json.loads(r.stdout)
    assert listed["state"] == "UNKNOWN(17)" and listed["health"] == "UNKNOWN(42)"
    r = pod.tpuctl("describe", "pod")
    assert r.returncode == 0 and "UNKNOWN(17)" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_an_empty_zone_says_so(pod):
    r = pod.tpuctl("list", "--zone", "us-east5-a")
    assert r.returncode == 0
    assert r.stdout == "" and "No TPUs in project proj, zone us-east5-a." in r.stderr


@pytest.mark.parametrize("answer", [None, HTTPStatus.NOT_FOUND, HTTPStatus.BAD_REQUEST])
def test_a_zone_that_does_not_exist_names_the_zones_there_are(pod, answer):
    """Whether the API lists a zone it does not offer as empty (the stand-in's default) or refuses it, tpuctl asks
    locations.list rather than say "No TPUs" or "not found"."""
    pod.api.unknown_zone_error = answer
    r = pod.tpuctl("list", "--zone", "us-centrl2-b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "zone 'us-centrl2-b' is not a Cloud TPU zone of project proj (did you mean us-central2-b" in r.stderr
    assert "europe-west4-a" in r.stderr  # every zone there is, as the API listed them
    assert any(req.path == "/v2/projects/proj/locations" for req in pod.api.requests)
    r = pod.tpuctl("describe", "pod", "--zone", "us-centrl2-b")  # the node is in zone-a: not found, and why
    assert r.returncode == 2 and "is not a Cloud TPU zone" in r.stderr, r.stderr


def test_permission_denied_is_one_line_naming_the_permission_and_a_role(pod):
    pod.api.denied_projects.add("proj")
    r = pod.tpuctl("list")
    assert r.returncode == 2
    assert r.stderr.startswith(
        "tpuctl: error: listing TPUs: permission denied in project proj, zone zone-a: your account lacks tpu.nodes.list"
    )
    assert "roles/tpu.viewer" in r.stderr and "--role=roles/tpu.viewer" in r.stderr
    assert r.stderr.count("\n") == 1
    r = pod.tpuctl("delete", "pod", "--yes")
    assert r.returncode == 2 and "lacks tpu.nodes." in r.stderr and r.stderr.count("\n") == 1


def test_a_disabled_api_says_which_to_enable(pod):
    """Google's answer carries a google.rpc.ErrorInfo with reason SERVICE_DISABLED: not a permission problem."""
    pod.api.disabled_projects.add("proj")
    r = pod.tpuctl("list")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "the Cloud TPU API is not enabled in project proj" in r.stderr
    assert "gcloud services enable tpu.googleapis.com --project proj" in r.stderr and "permission" not in r.stderr


def test_a_read_over_the_rate_limit_is_retried_then_named(pod):
    """429 on a read is retried with backoff; within the API timeout it passes, past it the error says rate limit
    (not "cannot reach the API")."""
    pod.api.rate_limited_reads = 2
    r = pod.tpuctl("list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "pod", r.stderr
    pod.api.rate_limited_reads = 10_000
    r = pod.tpuctl("list", env={"TPUCTL_API_TIMEOUT": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "kept refusing for rate limit or quota, retried for 1 s (429: Quota exceeded" in r.stderr
    assert "cannot reach" not in r.stderr


def test_an_unreachable_api_is_one_line_within_the_timeout(pod):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    start = time.monotonic()
    r = pod.tpuctl(
        "exec",
        "--",
        "true",
        env={"TPUCTL_API_ENDPOINT": f"http://127.0.0.1:{port}", "TPUCTL_API_TIMEOUT": "2"},
    )
    assert time.monotonic() - start < 15
    assert r.returncode == 2
    assert f"cannot reach the Cloud TPU API at http://127.0.0.1:{port}" in r.stderr
    assert r.stderr.count("\n") == 1


def test_no_credentials_for_the_real_endpoint_says_how_to_log_in(pod):
    # https endpoint -> Application Default Credentials; the test session has none (and no metadata server).
    r = pod.tpuctl("list", env={"TPUCTL_API_ENDPOINT": "https://tpu.googleapis.com"})
    assert r.returncode == 2
    assert r.stderr == (
        "tpuctl: error: no Google Cloud credentials found (run `gcloud auth application-default login`)\n"
    )
