"""python -m trainer.bench --model B/16 --res 224 --batch 256

Times the training step of one stage (the step `python -m trainer` runs, same shardings) on whatever devices JAX
sees, on one fixed synthetic batch already on the devices: step time, images/s, images/s per chip, model TFLOP/s per
chip and MFU (where the device's peak is known). A table for people, --json for scripts.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import click

from trainer.errors import UserError
from trainer.recipe import RecipeError, from_dict


def bench_recipe(options: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a one-stage run with the benchmark's settings (validated like any recipe)."""
    return {
        "model": {
            "image": options["model"],
            "text": options["text"],
            "decoder": options["decoder"],
            "dtype": options["dtype"],
            "remat": options["remat"],
            "attention": options["attention"],
            "scan_layers": options["scan_layers"],
        },
        "mesh": {"data": -1, "fsdp": options["fsdp"], "tensor": options["tensor"]},
        "stages": [
            {
                "name": "bench",
                "resolution": options["res"],
                "global_batch": options["batch"],
                "samples": options["batch"] * (options["steps"] + options["warmup"]),
                "peak_lr": 1e-4,
                "grad_accum": options["grad_accum"],
                "patch_keep": options["patch_keep"],
            }
        ],
    }


def measure(options: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np

    from trainer import data, sharding
    from trainer.hardware import peak_flops
    from trainer.models import flops
    from trainer.models.clip import build
    from trainer.program import compile_stage

    recipe = from_dict(bench_recipe(options))
    mesh = sharding.checked_mesh(recipe)
    stage = recipe.stages[0]
    model = build(recipe)
    program = compile_stage(model, recipe, stage, mesh)
    state = program.init_state()
    host = data.Host(jax.process_index(), jax.process_count())
    host_batch = next(data.open_stage(recipe, 0, host))[0]
    if recipe.data.color_jitter > 0:  # the step as real data drives it: colour jitter on the device
        draws = np.random.default_rng(0).random((len(host_batch["images"]), data.JITTER_DRAWS), np.float32)
        host_batch = {**host_batch, "colour": draws}
    batch = program.global_batch(host_batch)
    compile_start = time.perf_counter()
    for _ in range(options["warmup"]):  # the first compiles
        state, metrics = program.step(state, batch)
    jax.block_until_ready(metrics)
    compile_and_warmup_s = time.perf_counter() - compile_start
    times = []
    # No implicit transfer between host and device inside the step (a stray float() or np.asarray would be one: a
    # sync that stalls the pipeline); with this guard such a step fails here instead of being quietly slow.
    with jax.transfer_guard("disallow"):
        for _ in range(options["steps"]):
            start = time.perf_counter()
            state, metrics = program.step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    chips = jax.device_count()
    flops_per_step = flops.train_per_sample(recipe, stage) * stage.global_batch
    peak = peak_flops(jax.devices()[0].device_kind)
    xla_flops = xla_step_flops(options, state, batch) if options["check_flops"] else None
    return {
        "model": options["model"],
        "text": options["text"],
        "decoder": options["decoder"] or "-",
        "res": stage.resolution,
        "batch": stage.global_batch,
        "dtype": options["dtype"],
        "remat": options["remat"],
        "attention": model.image.layers.attention,
        "scan_layers": options["scan_layers"],
        "devices": f"{chips} x {jax.devices()[0].device_kind}",
        "step_s": step_s,
        "step_s_min": min(times),
        "img_per_s": stage.global_batch / step_s,
        "img_per_s_per_chip": stage.global_batch / step_s / chips,
        "tflops_per_chip": flops_per_step / step_s / chips / 1e12,
        "flops_per_step": flops_per_step,
        "xla_flops_per_step": xla_flops,
        "mfu": flops_per_step / step_s / (peak * chips) if peak else None,
        "compile_and_warmup_s": compile_and_warmup_s,
        "loss": float(metrics["loss"]),
    }


def xla_step_flops(options: dict[str, Any], state: Any, batch: Any) -> float:
    """XLA's own count of the training step's FLOPs (cost analysis of the compiled step, all devices together), for
    cross-checking the analytic count MFU uses. Its cost analysis counts a loop body once, so the step is compiled
    again with the layers unrolled (same parameters, same arithmetic); remat's recomputation is counted in it."""
    import jax

    from trainer.models import flops
    from trainer.models.clip import build
    from trainer.program import compile_stage
    from trainer.sharding import checked_mesh

    recipe = from_dict(bench_recipe({**options, "scan_layers": False}))
    program = compile_stage(build(recipe), recipe, recipe.stages[0], checked_mesh(recipe))
    step: Any = program.step  # a jitted function: it lowers
    return flops.xla_count(step.lower(state, batch)) * jax.device_count()  # the analysis is of one device's program


ROWS = (
    ("model", lambda r: f"{r['model']} image, {r['text']} text, decoder {r['decoder']}"),
    ("resolution", lambda r: f"{r['res']} px"),
    ("global batch", lambda r: str(r["batch"])),
    ("compute dtype / remat", lambda r: f"{r['dtype']} / {r['remat']}"),
    ("attention / layers", lambda r: f"{r['attention']} / {'scanned' if r['scan_layers'] else 'unrolled'}"),
    ("devices", lambda r: r["devices"]),
    ("step time (median)", lambda r: f"{1000 * r['step_s']:.1f} ms"),
    ("images/s", lambda r: f"{r['img_per_s']:.1f}"),
    ("images/s per chip", lambda r: f"{r['img_per_s_per_chip']:.1f}"),
    ("model TFLOP/s per chip", lambda r: f"{r['tflops_per_chip']:.2f}"),
    ("MFU", lambda r: "- (peak unknown)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
    ("compile + warm-up", lambda r: f"{r['compile_and_warmup_s']:.1f} s"),
    ("model GFLOP per step (counted)", lambda r: f"{r['flops_per_step'] / 1e9:.1f}"),
    ("XLA's count / counted", lambda r: "-" if r["xla_flops_per_step"] is None else xla_ratio(r)),
)


def xla_ratio(result: dict[str, Any]) -> str:
    return f"{result['xla_flops_per_step'] / result['flops_per_step']:.3f}"


def show(result: dict[str, Any], rows: tuple = ROWS, title: str = "trainer step benchmark") -> None:
    """One result as a two-column table (benchmarks/bench_open_clip.py shows its own rows with it too)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value(result))
    Console().print(table)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="B/16", show_default=True, help="Image tower VARIANT/PATCH.")
@click.option("--text", default="B", show_default=True, help="Text tower variant.")
@click.option("--decoder", default="", help="Caption decoder variant ('' = none).")
@click.option("--res", default=224, show_default=True, help="Image resolution.")
@click.option("--batch", default=256, show_default=True, help="Global batch.")
@click.option("--steps", default=10, show_default=True, help="Timed steps (the median is reported).")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps first (the first compiles).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--remat", type=click.Choice(["none", "block", "dots"]), default="none", show_default=True)
@click.option(
    "--attention", type=click.Choice(["auto", "xla", "cudnn"]), default="auto", show_default=True, help="Kernel."
)
@click.option("--scan-layers/--unroll-layers", default=True, show_default=True, help="Layer loop or straight code.")
@click.option("--check-flops", is_flag=True, help="Also compile the step unrolled and report XLA's FLOP count.")
@click.option("--fsdp", default=1, show_default=True, help="Mesh fsdp size (data takes the rest).")
@click.option("--tensor", default=1, show_default=True, help="Mesh tensor size.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per step.")
@click.option("--patch-keep", default=1.0, show_default=True, help="Fraction of patches kept (patch dropout).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def main(as_json: bool, **options: Any) -> None:
    """Time the training step of one model at one resolution and batch."""
    if options["steps"] < 1 or options["warmup"] < 1:
        raise UserError("--steps and --warmup must be at least 1")
    try:
        result = measure(options)
    except RecipeError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        show(result)


if __name__ == "__main__":
    main()
