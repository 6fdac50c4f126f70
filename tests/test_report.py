"""What host 0 prints: a live progress bar on a terminal, plain whole lines otherwise, nothing on other hosts."""

from __future__ import annotations

import io

from rich.console import Console

from trainer.recipe import Stage
from trainer.report import Report, describe, format_seconds

STAGE = Stage(name="pretrain16", resolution=16, global_batch=64, peak_lr=1e-3, samples=640)
RECORD = {
    "stage": "pretrain16",
    "stage_step": 5,
    "loss": 2.5,
    "lr": 1e-3,
    "img_per_s": 123.4,
    "mfu": 0.42,
    "eta_s": 3725.0,
}


def drive(console: Console, enabled: bool = True) -> str:
    report = Report(enabled, console)
    report.say("stage pretrain16: 10 steps")
    report.start_stage(STAGE, 10, 0)
    report.advance(5)
    report.log(RECORD)
    report.advance(10)
    report.close()
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_a_terminal_gets_a_progress_bar():
    out = drive(Console(file=io.StringIO(), force_terminal=True, width=120))
    assert "10/10" in out and "━" in out  # the bar, finished
    assert "loss 2.5" in out


def test_a_log_file_gets_one_whole_line_per_log():
    out = drive(Console(file=io.StringIO(), force_terminal=False, width=40, soft_wrap=True))
    lines = out.splitlines()
    assert lines == [
        "stage pretrain16: 10 steps",
        "pretrain16 5  loss 2.5  lr 0.001  img_per_s 123  mfu 42.0%  eta 1h02m",
    ]
    assert describe(RECORD) == lines[1]


def test_other_hosts_print_nothing():
    assert drive(Console(file=io.StringIO(), force_terminal=True), enabled=False) == ""


def test_durations():
    assert format_seconds(59) == "0m59s" and format_seconds(3725) == "1h02m"
