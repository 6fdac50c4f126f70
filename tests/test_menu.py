"""tpuctl menu, driven like a person would: in a real terminal (a tmux pane), with keys sent by `tmux send-keys`,
read back with `tmux capture-pane`. The pod is the usual stand-in (sshd workers + the local Cloud TPU API)."""

from __future__ import annotations

import contextlib
import subprocess

from standins import wait_until
from standins.pod import PROJECT, ZONE
from standins.tpu_api import OperationError


def wait_for_screen(tmux, text, timeout=30.0, times=1):
    def screen():
        return tmux("capture-pane", "-p", "-J", "-S", "-200").stdout

    return wait_until(lambda: (s := screen()).count(text) >= times and s, timeout, f"{text!r} on screen", screen)


@contextlib.contextmanager
def menu_in_tmux(pod, tmp_path, **env_overrides):
    """`tpuctl menu` in a 160x50 tmux pane; yields tmux(*args). The tmux server goes, also on failure."""
    env = {k: v for k, v in pod.env.items() if k not in ("TPUCTL_TPU", "TMUX")}
    env |= {"TMUX_TMPDIR": str(tmp_path), **env_overrides}

    def tmux(*args):
        return subprocess.run(["tmux", *args], env=env, capture_output=True, text=True, check=False)

    try:
        shell = f"{pod.tpuctl_path} menu; echo menu exited with $?; sleep 600"
        started = tmux("new-session", "-d", "-s", "menu", "-x", "160", "-y", "50", shell)
        assert started.returncode == 0, started.stderr
        yield tmux
    finally:
        tmux("kill-server")


def test_menu_picks_a_tpu_runs_check_and_shows_its_table(pod, tpu_api, make_fleet, tmp_path):
    tpu_api.add_fleet_node(PROJECT, ZONE, "other-pod", make_fleet(1))  # two TPUs to choose from
    with menu_in_tmux(pod, tmp_path) as tmux:
        screen = wait_for_screen(tmux, "TPU")
        assert "other-pod" in screen and "(READY" in screen
        order = [line for line in screen.splitlines() if "workers)" in line]
        presses = next(i for i, line in enumerate(order) if "pod  (" in line and "other-pod" not in line)
        tmux("send-keys", "-t", "menu", *["Down"] * presses, "Enter")
        screen = wait_for_screen(tmux, "? Action (Use arrow keys)")
        # the first screen: doctor's findings, as the TPU has no project dir yet (and the fix)
        assert any("remote dir" in line and "FAIL" in line and "tpuctl sync ." in line for line in screen.splitlines())
        tmux("send-keys", "-t", "menu", *["Down"] * 4, "Enter")  # list, ssh, sync, prepare, *check*
        screen = wait_for_screen(tmux, "holders (pid user cmd)")
        for w in pod.fleet.workers:
            assert any(f"w{w.index}" in line and w.ip in line and "free" in line for line in screen.splitlines())
        wait_for_screen(
            tmux, "? Action (Use arrow keys)", timeout=10
        )  # back in the loop (the answered prompt reads "? Action check the chips")
        tmux("send-keys", "-t", "menu", *["Down"] * 11, "Enter")  # ..., stop a run, *describe the TPU*
        screen = wait_for_screen(tmux, "health description")
        assert any("accelerator" in line and "v4-32" in line for line in screen.splitlines())
        assert any(line.startswith("worker 1") and pod.fleet.workers[1].ip in line for line in screen.splitlines())
        wait_for_screen(tmux, "? Action (Use arrow keys)", timeout=10)  # the loop again
        tmux("send-keys", "-t", "menu", "Up", "Enter")  # wraps around to the last choice: exit
        wait_for_screen(tmux, "menu exited with 0", timeout=10)


def test_menu_lists_tpus_across_the_zones_and_creates_one(pod, tpu_api, tmp_path):
    """The profile's zones: TPUs of every zone to pick from, and a new one made through `tpuctl create` in the first
    zone with room (zone-a has none), spot; the menu then acts on it."""
    tpu_api.add_node(PROJECT, "zone-b", "far-pod", [("10.9.0.1", None)], accelerator_type="v5litepod-8")
    tpu_api.full_zones = {ZONE: OperationError(8, "There is no more capacity in the zone")}
    tpu_api.queue_wait_s = 3600  # a request in line, with no node: listed, not pickable
    r = pod.tpuctl("create", "inline", "--type", "v4-8", "--queued", "--no-wait", "--zone", "zone-b")
    assert r.returncode == 0, r.stderr
    with menu_in_tmux(pod, tmp_path, TPUCTL_ZONES=f"{ZONE},zone-b") as tmux:
        screen = wait_for_screen(tmux, "create a new TPU...")
        assert "far-pod  (READY, v5litepod-8, 1 workers) in zone-b" in screen
        assert "inline  (queued: WAITING_FOR_RESOURCES, v4-8) in zone-b" in screen
        assert "`tpuctl delete inline --zone zone-b` cancels it" in screen
        assert f"pod  (READY, v4-32, {len(pod.fleet.workers)} workers) in {ZONE}" in screen
        tmux("send-keys", "-t", "menu", "Up", "Enter")  # the last choice: create a new TPU
        wait_for_screen(tmux, "? Name")
        tmux("send-keys", "-t", "menu", "fresh", "Enter")
        wait_for_screen(tmux, "? Accelerator type")
        tmux("send-keys", "-t", "menu", "Enter")  # the default, v4-8
        wait_for_screen(tmux, f"the first of {ZONE}, zone-b with room")
        tmux("send-keys", "-t", "menu", "Enter")
        wait_for_screen(tmux, "? Capacity")
        tmux("send-keys", "-t", "menu", "Down", "Enter")  # spot
        screen = wait_for_screen(tmux, f"TPU fresh in {PROJECT}/zone-b", timeout=60)
        assert f"{ZONE} refused" in screen and "got zone zone-b" in screen  # create's own lines
        wait_for_screen(tmux, "? Action (Use arrow keys)")
        tmux("send-keys", "-t", "menu", *["Down"] * 11, "Enter")  # describe the TPU: the new one, in zone-b
        screen = wait_for_screen(tmux, "health description")
        assert any("accelerator" in line and "v4-8" in line for line in screen.splitlines())
        assert any("capacity" in line and "spot" in line for line in screen.splitlines())
        wait_for_screen(tmux, "? Action (Use arrow keys)", timeout=10)
        tmux("send-keys", "-t", "menu", "Up", "Enter")
        wait_for_screen(tmux, "menu exited with 0", timeout=10)
    (made,) = tpu_api.creations()[-1:]
    assert made.path.split("/")[5] == "zone-b" and made.body["schedulingConfig"] == {"spot": True}


def test_menu_without_a_terminal_points_to_the_subcommands(pod):
    r = pod.tpuctl("menu")
    assert r.returncode == 2 and r.stderr.strip() == (
        "tpuctl: error: the menu needs a terminal (in scripts, use the subcommands: tpuctl --help)"
    )
