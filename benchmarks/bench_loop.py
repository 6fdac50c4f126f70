"""The training loop against its bare step: what the Python loop around the compiled step costs, what a checkpoint
save holds it for, and how much of a start the compilation cache saves.

    python benchmarks/bench_loop.py [--config tiny|b16] [--steps 200] [--breakdown] [--json]

For one configuration on the devices JAX sees (a CPU here):
- the bare step: the trainer's own jitted step (trainer/program.py) on a batch already on the device, dispatched
  `--steps` times and waited for once at the end (the best the loop could do);
- the loop: `python -m trainer` on the same recipe for `--steps` steps with its data pipeline, metrics, progress
  report, logs every 10 steps and checkpoints every 50; its `step_time_s` (wall time between logs over the steps
  in between), the mean over the logs after the first that hold no save, plus the mean time a save held the loop
  (`checkpoint_held_s`) over the real recipe's checkpoint cadence (tiny.toml's 500 steps, b16.toml's 1000): the
  loop's time a step at that cadence (`loop_over_bare_every_50`: at the run's own);
- their ratio, and the longest a checkpoint save held the loop against one step;
- the time from start to the first step, with an empty compilation cache and again with the one that start wrote;
- with --breakdown, the loop between checkpoints again with one log only, and on synthetic data (on a CPU the
  input pipeline decodes on the cores that run the step, which a TPU host's CPU does not), each against the bare
  step.

Configurations: `tiny` (recipes/tiny.toml on Fashion-MNIST, prepared into data/fashion-mnist when missing) and `b16`
(a B/16 image and text tower at 32 px, 8 images a step, on the tests' synthetic data).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "data" / "fashion-mnist"

# (recipe, overrides, the recipe whose checkpoint cadence the loop is amortised over). The runs log every 10 steps
# and checkpoint every 50, so that a short run sees several of each; the figures are then amortised over the real
# recipe's cadence (tiny.toml: 500 steps, b16.toml: 1000).
CADENCE = ["log.every_steps=10", "checkpoint.every_steps=50"]
CONFIGS = {
    "tiny": (ROOT / "recipes" / "tiny.toml", [*CADENCE, "stages.0.warmup_steps=0"], ROOT / "recipes" / "tiny.toml"),
    "b16": (
        ROOT / "tests" / "tiny_synthetic.toml",
        [
            *("model.image=B/16", "model.text=B", "model.decoder=", "model.dtype=float32"),
            *("stages.0.resolution=32", "stages.0.global_batch=8", "stages.0.warmup_steps=0", *CADENCE),
        ],
        ROOT / "recipes" / "b16.toml",
    ),
}


def one_stage(recipe: Path, directory: Path) -> Path:
    """The recipe with its first stage alone (the benchmark times one stage)."""
    text = recipe.read_text()
    first = text.index("[[stages]]")
    second = text.find("[[stages]]", first + 1)
    out = directory / "recipe.toml"
    out.write_text(text if second < 0 else text[:second])
    return out


def bare_step_s(recipe_path: Path, overrides: list[str], steps: int) -> float:
    """Seconds per step of the jitted step alone: dispatched `steps` times, waited for once (median of 3)."""
    import jax
    import jax.numpy as jnp

    from trainer import sharding
    from trainer.models.clip import build
    from trainer.program import compile_stage, example_batch
    from trainer.recipe import load

    recipe = load(recipe_path, overrides)
    stage = recipe.stages[0]
    mesh = sharding.checked_mesh(recipe)
    program = compile_stage(build(recipe), recipe, stage, mesh)
    state = program.init_state()
    shapes = example_batch(recipe, stage, stage.global_batch)
    batch = {k: jax.device_put(jnp.ones(v.shape, v.dtype), program.batch_sharding) for k, v in shapes.items()}
    for _ in range(2):  # compile, warm up
        state, _ = program.step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = program.step(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def train(recipe: Path, overrides: list[str], workdir: Path, cache: Path) -> tuple[str, list[dict]]:
    args = [sys.executable, "-m", "trainer", str(recipe), "--workdir", str(workdir), "--compile-cache", str(cache)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise SystemExit(f"the trainer failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return r.stdout + r.stderr, records


def first_step_s(output: str) -> tuple[float, int, int]:
    found = re.search(r"first step after ([\d.]+) s \((\d+) of (\d+) programs", output)
    if not found:
        raise SystemExit(f"no first-step line in the trainer's output:\n{output[-2000:]}")
    return float(found.group(1)), int(found.group(2)), int(found.group(3))


def measure(config: str, steps: int, breakdown: bool = False) -> dict:
    recipe, overrides, cadence_of = CONFIGS[config]
    if config == "tiny" and not FASHION.joinpath("vocab.txt").exists():
        prepare = [sys.executable, "-m", "trainer.data.prepare", "fashion-mnist", "/usr/share/datasets/fashion-mnist"]
        subprocess.run([*prepare, str(FASHION)], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        path = one_stage(recipe, scratch_dir)
        batch = 64 if config == "tiny" else 8
        sets = [*overrides, f"stages.0.samples={steps * batch}", "stages.0.eval_every=0"]
        bare = bare_step_s(path, sets, steps)
        cache = scratch_dir / "cache"
        cold_out, records = train(path, sets, scratch_dir / "cold", cache)
        warm_out, _ = train(path, sets, scratch_dir / "warm", cache)
        parts = {}
        if breakdown:  # the loop again without one of its parts each time (warm cache): what each costs
            for name, more in BREAKDOWN.items():
                if config in NOT_FOR.get(name, ()):
                    continue
                keys = {item.partition("=")[0] for item in more}
                variant = [item for item in sets if item.partition("=")[0] not in keys] + more
                parts[name] = loop_step_s(train(path, variant, scratch_dir / name, cache)[1]) / bare
    from trainer.recipe import load

    every = load(cadence_of).checkpoint.every_steps
    held = [r["checkpoint_held_s"] for r in records if "checkpoint_held_s" in r]
    between = loop_step_s([r for r in records if "checkpoint_held_s" not in r])  # the windows without a save
    amortised = between + statistics.mean(held) / every
    cold, warm = first_step_s(cold_out), first_step_s(warm_out)
    return {
        "config": config,
        "steps": steps,
        "bare_step_s": bare,
        "loop_step_s_between_checkpoints": between,
        "checkpoint_every_steps": every,
        "loop_step_s": amortised,
        "loop_over_bare": amortised / bare,
        "loop_over_bare_every_50": loop_step_s(records) / bare,
        "checkpoint_held_s": max(held),
        "checkpoint_held_over_step": max(held) / bare,
        "first_step_cold_s": cold[0],
        "first_step_warm_s": warm[0],
        "warm_over_cold": warm[0] / cold[0],
        "programs_from_cache_warm": f"{warm[1]} of {warm[2]}",
        **{f"loop_over_bare {name}": ratio for name, ratio in parts.items()},
    }


# The loop between checkpoints without one more of its parts: `--breakdown` (the stage's last checkpoint falls
# after the timing)
BREAKDOWN = {
    "with one log": ["checkpoint.every_steps=1000000", "log.every_steps=1000000"],
    "on synthetic data": ["checkpoint.every_steps=1000000", "data.source='synthetic'"],  # no tf.data beside the step
}
NOT_FOR = {"on synthetic data": ("b16",)}  # b16 is synthetic already


def loop_step_s(records: list[dict]) -> float:
    """The loop's seconds a step, amortised over its logs and checkpoints: the mean over the logged windows after the
    first (which follows the compile), or the one window there is."""
    timed = [r["step_time_s"] for r in records if "step_time_s" in r]
    return statistics.mean(timed[1:] if len(timed) > 1 else timed)


@click.command()
@click.option("--config", type=click.Choice(sorted(CONFIGS)), default="tiny", show_default=True)
@click.option("--steps", default=200, show_default=True, help="Steps of the loop (and of each bare-step timing).")
@click.option("--breakdown", is_flag=True, help="Also time the loop without each of its parts.")
@click.option("--json", "as_json", is_flag=True)
def main(config: str, steps: int, breakdown: bool, as_json: bool) -> None:
    result = measure(config, steps, breakdown)
    if as_json:
        click.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"the loop against its bare step: {config}, {steps} steps")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


if __name__ == "__main__":
    main()
