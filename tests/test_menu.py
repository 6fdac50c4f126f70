"""tpuctl menu, driven like a person would: in a real terminal (a tmux pane), with keys sent by `tmux send-keys`,
read back with `tmux capture-pane`. The pod is the usual stand-in (sshd workers + the local Cloud TPU API)."""

from __future__ import annotations

import subprocess

from standins import wait_until
from standins.pod import PROJECT, ZONE


def wait_for_screen(tmux, text, timeout=30.0, times=1):
    def screen():
        return tmux("capture-pane", "-p", "-J", "-S", "-200").stdout

    return wait_until(lambda: (s := screen()).count(text) >= times and s, timeout, f"{text!r} on screen", screen)


def test_menu_picks_a_tpu_runs_check_and_shows_its_table(pod, tpu_api, make_fleet, tmp_path):
    tpu_api.add_fleet_node(PROJECT, ZONE, "other-pod", make_fleet(1))  # two TPUs to choose from
    env = {k: v for k, v in pod.env.items() if k not in ("TPUCTL_TPU", "TMUX")} | {"TMUX_TMPDIR": str(tmp_path)}

    def tmux(*args):
        return subprocess.run(["tmux", *args], env=env, capture_output=True, text=True, check=False)

    try:
        started = tmux(
            "new-session",
            "-d",
            "-s",
            "menu",
            "-x",
            "160",
            "-y",
            "50",
            f"{pod.tpuctl_path} menu; echo menu exited with $?; sleep 600",
        )
        assert started.returncode == 0, started.stderr
        screen = wait_for_screen(tmux, "TPU")
        assert "other-pod" in screen and "(READY" in screen
        order = [line for line in screen.splitlines() if "workers)" in line]
        presses = next(i for i, line in enumerate(order) if "pod  (" in line and "other-pod" not in line)
        tmux("send-keys", "-t", "menu", *["Down"] * presses, "Enter")
        wait_for_screen(tmux, "? Action (Use arrow keys)")
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
    finally:
        tmux("kill-server")


def test_menu_without_a_terminal_points_to_the_subcommands(pod):
    r = pod.tpuctl("menu")
    assert r.returncode == 2 and r.stderr.strip() == (
        "tpuctl: error: the menu needs a terminal (in scripts, use the subcommands: tpuctl --help)"
    )
