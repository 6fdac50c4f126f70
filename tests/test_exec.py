"""tpuctl exec and ssh against real sshd workers found through the (local) Cloud TPU API."""

from __future__ import annotations

import json
import shlex

import pytest
from standins import wait_until


def test_exec_runs_on_every_worker_with_prefixes(pod4):
    r = pod4.tpuctl("exec", "--", "hostname")
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert lines == sorted(f"[w{w.index}] {w.hostname}" for w in pod4.fleet.workers)
    # the summary table goes to stderr, one row per worker
    for w in pod4.fleet.workers:
        assert f"w{w.index}" in r.stderr and w.ip in r.stderr


def test_exec_sends_words_exactly_as_given(pod):
    r = pod.tpuctl("exec", "--workers", "0", "--", "printf", "%s\\n", "a b", "$HOME", "it's", '"q"', "`x`", "")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[w0] a b", "[w0] $HOME", "[w0] it's", '[w0] "q"', "[w0] `x`", "[w0] "]


def test_exec_one_argument_is_a_shell_command_line(pod):
    r = pod.tpuctl("exec", "--workers", "1", "--", 'echo "$((40+2))" | tr 4 x; echo "$HOME"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[w1] x2", "[w1] /root"]


def test_exec_exit_status_is_the_worst_workers(pod4):
    r = pod4.tpuctl("exec", "--", 'case "$(hostname)" in w2-*) exit 7;; w3-*) exit 3;; esac; echo fine')
    assert r.returncode == 7
    assert r.stdout.count("fine") == 2


def test_exec_json(pod):
    r = pod.tpuctl("exec", "--json", "--", "echo out; echo err >&2; exit 4")
    assert r.returncode == 4
    data = json.loads(r.stdout)["workers"]
    assert [d["worker"] for d in data] == [0, 1]
    assert all(d["stdout"] == "out\n" and d["stderr"] == "err\n" and d["exit_code"] == 4 for d in data)
    assert all(d["status"] == "failed" for d in data)


def test_exec_group_prints_each_worker_together(pod):
    r = pod.tpuctl("exec", "--group", "--", "echo one; sleep 0.2; echo two")
    assert r.returncode == 0
    assert r.stdout == "one\ntwo\none\ntwo\n"


def test_exec_worker_selection_is_checked(pod):
    r = pod.tpuctl("exec", "--workers", "0,5", "--", "true")
    assert r.returncode == 2
    assert "worker 5 does not exist" in r.stderr and "workers 0-1" in r.stderr
    assert "Traceback" not in r.stderr


def test_only_tpuctls_own_verbose_flag_shows_tracebacks(pod):
    # a -v that belongs to the remote command is not tpuctl's: the error stays one line
    r = pod.tpuctl("exec", "--workers", "0,5", "--", "grep", "-v", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = pod.tpuctl("-v", "exec", "--workers", "0,5", "--", "grep", "-v", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr and "worker 5 does not exist" in r.stderr


def test_a_stopped_worker_is_named_and_does_not_stop_the_others(pod4):
    pod4.fleet.workers[2].stop_sshd()
    r = pod4.tpuctl("exec", "--", "hostname")
    assert r.returncode == 255
    assert r.stdout.count("[w") == 3 and "[w2]" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("w2 (") and "connection refused" in last


def test_a_hung_worker_times_out_without_blocking_the_others(pod):
    pod.fleet.workers[0].freeze()  # TCP connects, sshd never answers
    r = pod.tpuctl("exec", "--", "hostname", env={"TPUCTL_CONNECT_TIMEOUT": "1"}, timeout=30)
    assert r.returncode == 255
    assert f"[w1] {pod.fleet.workers[1].hostname}" in r.stdout
    assert "w0 (" in r.stderr and "no SSH answer within 1s" in r.stderr


def test_a_command_past_its_timeout_is_reported(pod):
    slow = pod.fleet.workers[1].hostname
    r = pod.tpuctl("exec", "--timeout", "1", "--", f'if [ "$(hostname)" = "{slow}" ]; then sleep 30; fi; echo done')
    assert r.returncode == 255
    assert "[w0] done" in r.stdout
    assert "w1 (" in r.stderr and "timed out after 1s" in r.stderr


def test_unknown_tpu_lists_the_existing_ones(pod):
    r = pod.tpuctl("exec", "--tpu", "nope", "--", "true")
    assert r.returncode == 2
    assert r.stderr.strip() == ("tpuctl: error: TPU 'nope' not found in project proj, zone zone-a (TPUs there: pod)")


def test_a_node_that_is_not_ready_is_refused(pod):
    pod.api.set_state("proj", "zone-a", "pod", "PREEMPTED")
    r = pod.tpuctl("exec", "--", "true")
    assert r.returncode == 2
    assert "TPU 'pod' is PREEMPTED, not READY" in r.stderr


def test_missing_key_is_one_line_when_tpuctl_may_not_make_it(pod, tmp_path):
    r = pod.tpuctl("exec", "--ssh-key", str(tmp_path / "nokey"), "--", "true", env={"TPUCTL_SSH_KEYS": "off"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "SSH key" in r.stderr and "does not exist and ssh_keys = off" in r.stderr
    assert "ssh_keys = auto" in r.stderr  # the fix
    assert not (tmp_path / "nokey").exists()


def test_wrong_user_is_reported_per_worker(pod):
    r = pod.tpuctl("exec", "--ssh-user", "nobody-here", "--", "true", env={"TPUCTL_SSH_KEYS": "off"})
    assert r.returncode == 255
    assert "authentication failed as 'nobody-here'" in r.stderr
    assert "authorise" in r.stderr and "ssh_keys = auto" in r.stderr  # what to do about it


def test_changed_host_key_is_refused_unless_replaced(pod):
    assert pod.tpuctl("exec", "--", "true").returncode == 0
    known = pod.known_hosts.read_text()
    assert all(w.ip in known for w in pod.fleet.workers)
    pod.fleet.workers[1].new_host_key()  # the VM was "recreated"
    r = pod.tpuctl("exec", "--", "true")
    assert r.returncode == 255
    assert "presented a different ssh-ed25519 host key" in r.stderr and "--replace-host-keys" in r.stderr
    r = pod.tpuctl("exec", "--replace-host-keys", "--", "true")
    assert r.returncode == 0, r.stderr
    assert pod.tpuctl("exec", "--", "true").returncode == 0  # the new key is now the recorded one


def test_ssh_runs_a_command_on_one_worker(pod):
    r = pod.tpuctl("ssh", "--worker", "1", "--", "hostname; echo '$HOME'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [pod.fleet.workers[1].hostname, "$HOME"]


def test_ssh_exit_status_passes_through(pod):
    assert pod.tpuctl("ssh", "--", "exit 9").returncode == 9


@pytest.mark.slow
def test_exec_on_sixteen_workers(make_pod):
    pod = make_pod(16)
    r = pod.tpuctl("exec", "--json", "--", "hostname")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)["workers"]
    assert [d["stdout"].strip() for d in data] == [w.hostname for w in pod.fleet.workers]


def test_a_worker_that_dies_mid_command_is_named(pod):
    import subprocess

    # w1's command outlasts any slow moment of this VM (the crash must land while it runs); w0's ends in a second
    w1 = shlex.quote(pod.fleet.workers[1].hostname)
    command = f'echo started; if [ "$(hostname)" = {w1} ]; then sleep 120; else sleep 1; fi; echo finished'
    proc = subprocess.Popen(
        [pod.tpuctl_path, "exec", "--", command],
        env=pod.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # streamed line by line: crash w1 once its command is surely running (not after a
        seen.append(line)  # fixed sleep, which a slow moment of this VM can outlast)
        if "[w1] started" in line:
            break
    pod.fleet.workers[1].crash()
    rest, err = proc.communicate(timeout=30)
    out = "".join(seen) + rest
    assert proc.returncode == 255
    assert "[w0] finished" in out and "[w1] started" in out and "[w1] finished" not in out
    assert err.strip().splitlines()[-1].startswith("w1 (") and "connection lost" in err


def test_missing_local_tools_are_one_line(pod, tmp_path):
    r = pod.tpuctl("ssh", "--", "true", env={"PATH": str(tmp_path)})
    assert (
        r.returncode == 2
        and r.stderr == "tpuctl: error: ssh is not installed on this machine (install openssh-client)\n"
    )
    r = pod.tpuctl("sync", str(tmp_path), env={"PATH": str(tmp_path)})
    assert r.returncode == 2
    assert (
        r.stderr == "tpuctl: error: rsync is not installed on this machine (install it, e.g. `apt-get install rsync`)\n"
    )


def test_ssh_opens_an_interactive_shell_in_a_terminal(pod):
    import subprocess
    import uuid

    tmux = ["tmux", "-L", f"tpuctl-test-{uuid.uuid4().hex[:8]}"]
    worker = pod.fleet.workers[1]

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout

    def wait_for(text: str) -> None:
        wait_until(lambda: text in screen(), 15, f"{text!r} on the screen", screen)

    try:
        start = [*tmux, "new-session", "-d", "-x", "150", "-y", "40", f"{pod.tpuctl_path} ssh --worker 1; sleep 60"]
        subprocess.run(start, env=pod.env, check=True)
        wait_for("#")  # root's prompt on the worker
        subprocess.run([*tmux, "send-keys", "echo on-$(hostname)-now", "Enter"], check=True)
        wait_for(f"on-{worker.hostname}-now")
        subprocess.run([*tmux, "send-keys", "exit", "Enter"], check=True)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_a_single_worker_pod(make_pod):
    pod = make_pod(1)
    r = pod.tpuctl("exec", "--", "hostname")
    assert r.returncode == 0 and r.stdout == f"[w0] {pod.fleet.workers[0].hostname}\n"
    assert pod.tpuctl("check").returncode == 0


def test_workers_without_external_ips_need_internal_ip(pod):
    node = pod.api.nodes[("proj", "zone-a", "pod")]
    for endpoint in node["networkEndpoints"]:
        endpoint.pop("accessConfig", None)
    r = pod.tpuctl("exec", "--", "true")
    assert r.returncode == 2
    assert r.stderr == (
        f"tpuctl: error: worker 0 has no external IP (internal {pod.fleet.workers[0].ip}) "
        "(from inside the VPC, use --internal-ip or TPUCTL_INTERNAL_IP=1)\n"
    )
    r = pod.tpuctl("exec", "--internal-ip", "--", "hostname")
    assert r.returncode == 0 and sorted(r.stdout.split()) == sorted(
        [f"[w{w.index}]" for w in pod.fleet.workers] + [w.hostname for w in pod.fleet.workers]
    )


def test_exec_dry_run_prints_the_remote_line_and_runs_nothing(pod):
    r = pod.tpuctl("exec", "--dry-run", "--workers", "1", "--", "touch", "/tmp/it's here")
    assert r.returncode == 0
    assert r.stdout == "touch '/tmp/it'\"'\"'s here'\n"
    assert f"Would run on 1 worker ({pod.fleet.workers[1].ip})" in r.stderr
    assert not pod.fleet.workers[1].path("/tmp/it's here").exists()


def test_recorded_addresses_spare_the_api_and_are_trusted_only_with_their_host_keys(pod, make_fleet, tpu_api):
    """tpuctl.endpoints: a second command within node_cache_s asks the API nothing; a worker whose host key is not the
    recorded one never runs the command (the API is asked, and the usual host-key refusal follows); a TPU whose
    workers moved is found again through the API."""
    from standins.pod import NODE, PROJECT, ZONE

    def api_calls():
        return len([q for q in tpu_api.requests if q.method == "GET"])

    assert pod.tpuctl("exec", "--", "true").returncode == 0
    asked = api_calls()
    r = pod.tpuctl("exec", "--", "hostname")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    assert api_calls() == asked  # the recorded addresses, confirmed by the workers' host keys

    w1 = pod.fleet.workers[1]
    w1.new_host_key()  # another machine at w1's address
    r = pod.tpuctl("exec", "--", "touch /root/ran")
    assert r.returncode == 255 and "presented a different ssh-ed25519 host key" in r.stderr, r.stderr
    assert not w1.path("/root/ran").exists() and pod.fleet.workers[0].path("/root/ran").exists()
    assert api_calls() > asked  # the doubt went to the API

    moved = make_fleet(2, like=pod.fleet)  # the TPU's VMs now live elsewhere; the old addresses answer no more
    for w in pod.fleet.workers:
        w.crash()
    tpu_api.add_fleet_node(PROJECT, ZONE, NODE, moved)
    r = pod.tpuctl("exec", "--", "hostname")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"[w{w.index}] {w.hostname}" for w in moved.workers)
