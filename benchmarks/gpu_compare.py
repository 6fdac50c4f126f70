"""Our training step against open_clip's on the same GPU, in one go: the table issue 6 asks for.

Each measurement is its own process (`python -m trainer.bench ... --json` or `benchmarks/bench_open_clip.py ...
--json`), so no run inherits another's memory, compile cache or allocator state; they run in the order below, most
important first (the targets, then the other models, then the levers one at a time), until the time budget runs out:
what is left is listed as skipped, not guessed. Prints a table and writes gpu.md (RESULTS.md-ready) and gpu.json to
--out. benchmarks/gpu.sh is the one device call that runs this; `--quick` runs tiny models on whatever is there (the
CPU here) to check the script itself.

    python benchmarks/gpu_compare.py --out $OUT --budget 480
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_BENCH = str(ROOT / "benchmarks" / "bench_open_clip.py")


@dataclass(frozen=True)
class Run:
    name: str  # the row's label
    framework: str  # "ours" or "open_clip"
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # extra environment (XLA flags)
    baseline: str = ""  # the row this one is compared with (img/s ratio)


def ours(name: str, *args: str, baseline: str = "", env: dict[str, str] | None = None) -> Run:
    return Run(name, "ours", ("-m", "trainer.bench", *args, "--json"), env or {}, baseline)


def theirs(name: str, *args: str) -> Run:
    return Run(name, "open_clip", (OPEN_CLIP_BENCH, *args, "--json"))


def b16(res: int, batch: int) -> tuple[str, ...]:
    return ("--model", "B/16", "--text", "B", "--res", str(res), "--batch", str(batch))


def open_clip_b16(res: int, batch: int, mode: str) -> tuple[str, ...]:
    return ("--model", "ViT-B-16", "--res", str(res), "--batch", str(batch), mode)


LHS = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"}
NO_TRITON_GEMM = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}
OPEN_CLIP_224 = "open_clip B/16 @224 b256, compiled"
OPEN_CLIP_112 = "open_clip B/16 @112 b1024, compiled"
OURS_224 = "ours B/16 @224 b256"


def full_plan() -> list[Run]:
    """Targets first: B/16 at 224 and 112 against open_clip compiled (>= 1.5x each), then what the issue also asks,
    then the levers, each alone against our B/16 @224."""
    return [
        theirs(OPEN_CLIP_224, *open_clip_b16(224, 256, "--compile")),
        ours(OURS_224, *b16(224, 256), "--check-flops", baseline=OPEN_CLIP_224),
        theirs(OPEN_CLIP_112, *open_clip_b16(112, 1024, "--compile")),
        ours("ours B/16 @112 b1024", *b16(112, 1024), baseline=OPEN_CLIP_112),
        ours("ours L/14 @224 b256", "--model", "L/14", "--text", "L", "--res", "224", "--batch", "256"),
        ours("ours B/16 + B decoder @224 b256", *b16(224, 256), "--decoder", "B"),
        ours("lever: XLA attention", *b16(224, 256), "--attention", "xla", baseline=OURS_224),
        ours("lever: layers unrolled", *b16(224, 256), "--unroll-layers", baseline=OURS_224),
        ours("lever: latency-hiding scheduler", *b16(224, 256), env=LHS, baseline=OURS_224),
        ours("lever: no Triton GEMMs", *b16(224, 256), env=NO_TRITON_GEMM, baseline=OURS_224),
        ours("lever: batch 512", *b16(224, 512), baseline=OURS_224),
        ours("lever: remat dots, batch 512", *b16(224, 512), "--remat", "dots", baseline=OURS_224),
        theirs("open_clip B/16 @224 b256, eager", *open_clip_b16(224, 256, "--eager")),
    ]


def quick_plan(tiny_config: str) -> list[Run]:
    """The same shape of plan with tiny models on the CPU: checks the script, not the speed."""
    small = ("--model", "Mu/8", "--text", "Mu", "--res", "32", "--batch", "8", "--steps", "2", "--warmup", "1")
    oc = ("--model-config", tiny_config, "--res", "32", "--batch", "8", "--steps", "2", "--warmup", "1")
    return [
        theirs("open_clip tiny, eager", *oc, "--device", "cpu", "--precision", "fp32", "--eager"),
        ours("ours Mu/8", *small, "--dtype", "float32", "--check-flops", baseline="open_clip tiny, eager"),
        ours("lever: layers unrolled", *small, "--dtype", "float32", "--unroll-layers", baseline="ours Mu/8"),
    ]


TINY_OPEN_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def measure(run: Run, python: dict[str, str], timeout: float) -> dict[str, Any]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, **run.env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if "XLA_FLAGS" in run.env and os.environ.get("XLA_FLAGS"):
        env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {run.env['XLA_FLAGS']}"
    start = time.monotonic()
    try:
        done = subprocess.run(
            [python[run.framework], *run.args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over its {timeout:.0f} s", "wall_s": time.monotonic() - start}
    wall = time.monotonic() - start
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        return {"error": f"exit {done.returncode}: {lines[-1][:300]}", "wall_s": wall, "stderr": done.stderr[-4000:]}
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no JSON on stdout", "wall_s": wall, "stdout": done.stdout[-2000:]}
    return {**result, "wall_s": wall}


def tflops(result: dict[str, Any]) -> float | None:
    """Model TFLOP/s per device, the same quantity for both: 3 x forward FLOPs per step / step time."""
    if "tflops_per_chip" in result:
        return result["tflops_per_chip"]
    return result.get("tflops")


def row(run: Run, result: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> list[str]:
    if "error" in result:
        return [run.name, "-", "-", "-", "-", result["error"]]
    base = by_name.get(run.baseline, {})
    ratio = f"{result['img_per_s'] / base['img_per_s']:.2f}x" if base.get("img_per_s") else ""
    mfu = result.get("mfu")
    tf = tflops(result)
    notes = []
    if result.get("xla_flops_per_step"):
        notes.append(f"XLA count / ours {result['xla_flops_per_step'] / result['flops_per_step']:.3f}")
    if result.get("attention"):
        notes.append(f"attention {result['attention']}")
    return [
        run.name,
        f"{result['img_per_s']:,.0f}",
        "-" if tf is None else f"{tf:.1f}",
        "-" if mfu is None else f"{100 * mfu:.1f}%",
        f"{ratio} vs {run.baseline}" if ratio else "",
        ", ".join(notes),
    ]


HEADER = ["config", "img/s", "model TFLOP/s", "MFU", "ratio", "notes"]


def markdown(rows: list[list[str]], device: str, skipped: list[str]) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"## {when} — trainer vs open_clip on one GPU: {device}",
        "",
        "Command: `bash benchmarks/gpu.sh` (one device call; `benchmarks/gpu_compare.py` runs each row as its own "
        "process; bf16, AdamW, random data; MFU = 3 x forward FLOPs / step time / 989 TFLOP/s)",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|:--|--:|--:|--:|:--|:--|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    if skipped:
        lines += ["", "Not run (the time budget ran out): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def device_of(results: list[dict[str, Any]]) -> str:
    for r in results:
        if r.get("devices"):
            return r["devices"]
        if r.get("device"):
            return r["device"]
    return "unknown device"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default=lambda: os.environ.get("OUT", "gpu-out"), help="Folder for gpu.md and gpu.json.")
@click.option("--budget", default=480.0, show_default=True, help="Seconds for all runs; the rest is skipped.")
@click.option("--per-run", default=240.0, show_default=True, help="Seconds one run may take.")
@click.option("--quick", is_flag=True, help="Tiny models (on the CPU): check the script, not the speed.")
@click.option("--only", multiple=True, help="Run only the rows whose name contains this (repeatable).")
@click.option("--jax-python", default=sys.executable, show_default=True, help="Python with jax (ours).")
@click.option("--torch-python", default=sys.executable, show_default=True, help="Python with torch (open_clip).")
def main(
    out: str, budget: float, per_run: float, quick: bool, only: tuple[str, ...], jax_python: str, torch_python: str
) -> None:
    from rich.console import Console
    from rich.table import Table

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        config = out_dir / "tiny-clip.json"
        config.write_text(json.dumps(TINY_OPEN_CLIP))
        plan = quick_plan(str(config))
    else:
        plan = full_plan()
    if only:  # a baseline stays in when a row that is compared with it does
        wanted = {r.name for r in plan if any(o in r.name for o in only)}
        wanted |= {r.baseline for r in plan if r.name in wanted}
        plan = [r for r in plan if r.name in wanted]
    python = {"ours": jax_python, "open_clip": torch_python}
    console = Console()
    deadline = time.monotonic() + budget
    results: dict[str, dict[str, Any]] = {}
    skipped = []
    for run in plan:
        left = deadline - time.monotonic()
        if left < 30:
            skipped.append(run.name)
            continue
        console.print(f"[bold]{run.name}[/] ...", highlight=False)
        results[run.name] = measure(run, python, min(per_run, left))
        r = results[run.name]
        console.print(f"  {r.get('error') or format(r['img_per_s'], ',.0f') + ' img/s'} ({r['wall_s']:.0f} s)")
    rows = [row(run, results[run.name], results) for run in plan if run.name in results]
    table = Table(title="trainer vs open_clip, one device")
    for name in HEADER:
        table.add_column(name, justify="right" if name in ("img/s", "model TFLOP/s", "MFU") else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    device = device_of(list(results.values()))
    (out_dir / "gpu.md").write_text(markdown(rows, device, skipped))
    (out_dir / "gpu.json").write_text(json.dumps({"device": device, "results": results, "skipped": skipped}, indent=1))
    console.print(f"wrote {out_dir / 'gpu.md'} and {out_dir / 'gpu.json'}")


if __name__ == "__main__":
    main()
