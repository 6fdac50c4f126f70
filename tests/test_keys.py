"""tpuctl's own SSH key (made as gcloud makes its key, never overwritten) and its line in a TPU node's `ssh-keys`
metadata, written through the real google-cloud-tpu client's UpdateNode against the local Cloud TPU API."""

from __future__ import annotations

import stat
import subprocess

import paramiko
import pytest
from standins.pod import PROJECT, ZONE
from standins.tpu_api import FakeTpuApi

from tpuctl import keys, lifecycle
from tpuctl.cloud import TpuApi
from tpuctl.config import Settings
from tpuctl.errors import ConfigError

ALICE = "alice:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQalice alice@laptop"


def test_a_missing_key_is_made_once_and_never_overwritten(tmp_path):
    path = tmp_path / "ssh" / "google_compute_engine"
    public, made = keys.ensure_key(path, "jane@host")
    assert made and public.startswith("ssh-ed25519 ") and len(public.split()) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = paramiko.PKey.from_path(path)  # what tpuctl's connections load
    assert f"{key.get_name()} {key.get_base64()}" == public
    assert path.with_name(path.name + ".pub").read_text() == f"{public} jane@host\n"
    before = path.read_bytes()
    assert keys.ensure_key(path, "jane@host") == (public, False) and path.read_bytes() == before


def test_the_public_key_of_a_key_without_its_pub_file_is_derived(tmp_path):
    """An existing key (gcloud's RSA one, say) whose .pub is gone: its public half is what ssh-keygen derives."""
    path = tmp_path / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(path)], check=True)
    want = " ".join(path.with_name("id_rsa.pub").read_text().split()[:2])
    path.with_name("id_rsa.pub").unlink()
    assert keys.public_key(path) == want and keys.ensure_key(path, "x") == (want, False)
    bad = tmp_path / "garbage"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        keys.public_key(bad)


def test_our_line_is_added_once_and_every_other_line_is_kept():
    ours = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurs"
    merged = keys.with_key(ALICE + "\n\nbob:ssh-ed25519 AAAAbob bob\n", "jane", ours)
    assert merged == "\n".join([ALICE, "bob:ssh-ed25519 AAAAbob bob", f"jane:{ours} jane"])
    assert keys.with_key(merged, "jane", ours) is None  # there already: nothing to write
    assert keys.with_key(f"jane:{ours} jane@laptop", "jane", ours) is None  # whatever its comment
    assert keys.with_key(f"bob:{ours} bob", "jane", ours) == f"bob:{ours} bob\njane:{ours} jane"  # another user's
    assert keys.with_key("", "jane", ours) == f"jane:{ours} jane"


@pytest.fixture
def api(tpu_api: FakeTpuApi) -> TpuApi:
    return TpuApi(Settings(project=PROJECT, zone=ZONE, api_endpoint=tpu_api.endpoint, api_timeout=10))


def metadata_of(tpu_api: FakeTpuApi, name: str = "pod") -> dict[str, str]:
    return tpu_api.nodes[(PROJECT, ZONE, name)].get("metadata", {})


def patches(tpu_api: FakeTpuApi) -> list:
    return [r for r in tpu_api.requests if r.method == "PATCH"]


def test_the_key_goes_into_the_nodes_metadata_keeping_everything_else(tpu_api, api, tmp_path):
    node = tpu_api.add_node(PROJECT, ZONE, "pod", [("10.0.0.2", None)])
    node["metadata"] = {"ssh-keys": ALICE, "startup-script": "echo hi"}
    public, _ = keys.ensure_key(tmp_path / "key", "jane@host")
    said: list[str] = []
    assert lifecycle.add_ssh_key(api, "pod", "jane", public, poll=0.05, say=said.append) is True
    assert metadata_of(tpu_api) == {"ssh-keys": f"{ALICE}\njane:{public} jane", "startup-script": "echo hi"}
    (patch,) = patches(tpu_api)  # UpdateNode as the client sends it: the field mask names metadata alone
    assert (
        patch.query["updateMask"] == ["metadata"] and patch.path == f"/v2/projects/{PROJECT}/locations/{ZONE}/nodes/pod"
    )
    assert said == ["pod: SSH key for 'jane' in the node's metadata"]
    # there already: read, not written
    assert lifecycle.add_ssh_key(api, "pod", "jane", public, poll=0.05) is False and len(patches(tpu_api)) == 1
    assert ("metadata", ["ssh-keys", "startup-script"]) in api.get_node("pod").to_json().items()  # keys, no values


def test_a_concurrent_write_that_drops_our_line_is_noticed_and_written_again(tpu_api, api, tmp_path):
    """The API replaces the metadata whole and a node has no fingerprint to write against: another client that read
    the metadata before our write and writes after it drops our line. The re-read after the write sees that."""
    node = tpu_api.add_node(PROJECT, ZONE, "pod", [("10.0.0.2", None)])
    node["metadata"] = {"ssh-keys": ALICE}
    bob = "bob:ssh-ed25519 AAAAbob bob"

    def concurrent_writer(stored: dict) -> None:  # once: its read-modify-write from the old value lands after ours
        tpu_api.after_update = None
        stored["metadata"] = {"ssh-keys": f"{ALICE}\n{bob}"}

    tpu_api.after_update = concurrent_writer
    public, _ = keys.ensure_key(tmp_path / "key", "jane@host")
    assert lifecycle.add_ssh_key(api, "pod", "jane", public, poll=0.05) is True
    assert metadata_of(tpu_api)["ssh-keys"].splitlines() == [ALICE, bob, f"jane:{public} jane"]
    assert len(patches(tpu_api)) == 2


def test_a_refused_update_is_one_line_naming_the_permission(tpu_api, api, tmp_path):
    tpu_api.add_node(PROJECT, ZONE, "pod", [("10.0.0.2", None)])
    tpu_api.read_only_projects.add(PROJECT)  # TPU Viewer: the node can be read, not changed
    public, _ = keys.ensure_key(tmp_path / "key", "jane@host")
    from tpuctl.errors import CloudError

    with pytest.raises(CloudError) as refused:
        lifecycle.add_ssh_key(api, "pod", "jane", public, poll=0.05)
    message = str(refused.value)
    assert "tpu.nodes.update" in message and "roles/tpu.admin" in message and "\n" not in message


def test_an_update_mask_the_api_does_not_support_is_refused_by_the_stand_in(tpu_api):
    """The stand-in holds UpdateNode to the paths tpu.v2.json lists, as the real API does."""
    import json
    import urllib.error
    import urllib.request

    tpu_api.add_node(PROJECT, ZONE, "pod", [("10.0.0.2", None)])
    url = f"{tpu_api.endpoint}/v2/projects/{PROJECT}/locations/{ZONE}/nodes/pod?updateMask=acceleratorType"
    request = urllib.request.Request(url, data=json.dumps({"acceleratorType": "v4-8"}).encode(), method="PATCH")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and "acceleratorType" in refused.value.read().decode()
    # a path the real API takes but the stand-in does not implement: its gap, not a refusal the API would give
    nested = request.full_url.replace("acceleratorType", "networkConfig.enableExternalIps")
    with pytest.raises(urllib.error.HTTPError) as gap:
        urllib.request.urlopen(urllib.request.Request(nested, data=b"{}", method="PATCH"), timeout=10)
    assert gap.value.code == 501
