"""`python -m trainer.bench`: times the real training step and reports consistent figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from standins import warm

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def bench(*args: str) -> subprocess.CompletedProcess:
    return warm.run([sys.executable, "-m", "trainer.bench", *args], env=ENV, timeout=240)


def test_bench_reports_step_time_throughput_and_flops(capsys):
    r = bench(
        "--model",
        "Ti/16",
        "--text",
        "Ti",
        "--res",
        "32",
        "--batch",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        "--dtype",
        "float32",
        "--check-flops",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["model"] == "Ti/16" and got["res"] == 32 and got["batch"] == 8 and got["devices"] == "1 x cpu"
    assert got["attention"] == "xla"  # "auto" on a CPU: cuDNN's kernel is for GPUs
    # the analytic count MFU divides by agrees with XLA's own count of the compiled (unrolled) step, forward and
    # backward; XLA adds the elementwise work (norms, softmax, GELU, AdamW) the analytic count leaves out
    assert 1.0 < got["xla_flops_per_step"] / got["flops_per_step"] < 1.1
    assert got["img_per_s"] == pytest.approx(8 / got["step_s"])
    assert got["mfu"] is None  # a CPU has no known peak
    assert got["tflops_per_chip"] > 0 and got["loss"] == got["loss"]  # finite, not NaN
    # without --json the same result is this table (one benchmark run for both: each compiles a step)
    from trainer.bench import show

    show(got)
    table = capsys.readouterr().out
    for row in ("step time (median)", "images/s per chip", "model TFLOP/s per chip", "MFU"):
        assert row in table


def test_bench_rejects_bad_settings_in_one_line():
    r = bench("--model", "B/15")
    assert r.returncode == 2 and r.stderr.strip().startswith('Error: model.image = "B/15" is not VARIANT/PATCH')
    assert "Traceback" not in r.stderr
    r = bench("--model", "Ti/16", "--text", "Ti", "--res", "32", "--batch", "8", "--attention", "cudnn")
    assert r.returncode == 2 and "model.attention = 'cudnn' needs a GPU" in r.stderr and "Traceback" not in r.stderr
