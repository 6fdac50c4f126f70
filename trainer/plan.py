"""python -m trainer.plan RECIPE --type v4-256 [--set KEY=VALUE ...] [--hbm-gib G] [--json]

Whether each stage of a recipe fits its pod, before the pod is paid for. Every stage's train step (the one
`python -m trainer` runs: the same model, optimizer, shardings and donation) and its evals' encoders are compiled
by the real TPU compiler, libtpu (the `tpu` extra), for the accelerator type's topology, on this machine and with no
TPU. Per stage: what one chip holds (parameters and optimizer state, the step's temporaries and outputs) against its
HBM, whether it fits (the compiler's word, and where it refuses, what it needed), and the step's FLOPs per chip
against the chip's peak. These are the compiler's own figures, the ones a pod fails on (RESOURCE_EXHAUSTED); the
time is only a bound (FLOPs over peak), never a promise.

Plans are cached by the recipe, the type and the jax and libtpu versions (TPUCTL_PLAN_CACHE, else
~/.cache/tpuctl/plans). Exit status: 0 every stage fits, 1 one does not (named, with the ways to make it fit), 2 a
recipe or flag mistake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from trainer import tpu_types
from trainer.errors import UserError
from trainer.recipe import Recipe, RecipeError, Stage, check_devices, load

PLAN_FORMAT = 1  # bump when a plan's fields change: older cached plans are then compiled again
GIB = tpu_types.GIB
# libtpu's refusal of a program that does not fit: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory
# required for HLO temporaries (112.51G) exceeds available HBM (15.75G)."
OUT_OF_MEMORY = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)")
UNITS = {None: 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class Memory:
    """One compiled program's bytes per device, as the compiler lays them out; where it refused the program, its
    temporaries as the refusal states them, and the HBM it said was available."""

    arguments: int  # parameters and optimizer state, and the batch's rows
    temporaries: int
    total: int  # arguments + temporaries + outputs that reuse no donated buffer + code
    compiled_flops: float | None  # per device, XLA's count (a scanned layer's body counted once); None: refused
    available: int | None = None  # the HBM the compiler said it had, when it refused

    @property
    def fits(self) -> bool:
        return self.compiled_flops is not None


def argument_bytes(args: Any) -> int:
    """What the arguments (ShapeDtypeStructs with shardings) take on one device."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(args))


def compile_memory(fn: Any, *args: Any) -> Memory:
    """`fn.lower(*args).compile()` for the TPU: its memory, or what it needed where the compiler refused it."""
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # jax raises JaxRuntimeError with libtpu's message
        found = OUT_OF_MEMORY.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        temporaries = int(float(found.group(1)) * UNITS[found.group(2)])
        arguments = argument_bytes(args)
        available = int(float(found.group(3)) * UNITS[found.group(4)])
        return Memory(arguments, temporaries, arguments + temporaries, None, available)
    stats = compiled.memory_analysis()
    fixed = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.generated_code_size_in_bytes
    )
    # libtpu reports the program's peak: what is live at once, arguments and code included (its temp size adds up
    # buffers that are never live together); XLA:CPU reports no peak
    peak = getattr(stats, "peak_memory_in_bytes", 0)
    temporaries = max(0, peak - fixed) if peak else stats.temp_size_in_bytes
    peak = peak or fixed + temporaries
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return Memory(stats.argument_size_in_bytes, temporaries, peak, flops)


def topology_devices(tpu: tpu_types.TpuType) -> list[Any]:
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topology_name=tpu.topology,
            platform="tpu",
            chip_config_name=tpu.generation.chip_config,
            chips_per_host_bounds=tpu.host_bounds,
            num_slices=1,
        )
    except RuntimeError as e:
        if "TPU support not installed" not in str(e):
            raise
        raise UserError("the plan compiles with libtpu, which is not installed here: pip install -e '.[tpu]'") from None
    return list(desc.devices)


def train_memory(recipe: Recipe, stage: Stage, devices: list[Any]) -> Memory:
    """The stage's train step, compiled for `devices` as the trainer compiles it."""
    import jax

    from trainer import sharding
    from trainer.models.clip import build
    from trainer.program import compile_stage, example_batch

    mesh = sharding.make_mesh(recipe.mesh, devices)
    program = compile_stage(build(recipe), recipe, stage, mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.batch_sharding)
        for k, v in example_batch(recipe, stage, stage.global_batch).items()
    }
    return compile_memory(program.step, program.abstract_state, batch)


def eval_memory(recipe: Recipe, stage: Stage, devices: list[Any]) -> Memory | None:
    """The evals' image encoder at the largest eval batch and the stage's resolution (the text encoder's prompts are
    smaller), beside the parameters; None without evals."""
    if not recipe.evals:
        return None
    import jax
    import jax.numpy as jnp

    from trainer import sharding
    from trainer.evals.zeroshot import encoders
    from trainer.models.clip import build
    from trainer.program import abstract_params

    mesh = sharding.make_mesh(recipe.mesh, devices)
    model = build(recipe)
    params = abstract_params(model, recipe, stage, mesh)
    batch = max(e.batch for e in recipe.evals)
    images = jax.ShapeDtypeStruct(
        (batch, stage.resolution, stage.resolution, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh)
    )
    _, encode_image = encoders(model)
    return compile_memory(encode_image, {"params": params}, images)


def plan_stage(recipe: Recipe, index: int, tpu: tpu_types.TpuType, devices: list[Any], hbm: int) -> dict:
    from trainer.hardware import peak_flops
    from trainer.models import flops

    stage = recipe.stages[index]
    memory = train_memory(recipe, stage, devices)
    evals = eval_memory(recipe, stage, devices)
    fits = memory.fits and memory.total <= hbm  # the compiler refuses what does not fit the chip at all
    model_flops = flops.train_per_sample(recipe, stage) * stage.global_batch / len(devices)
    return {
        "stage": stage.name,
        "resolution": stage.resolution,
        "global_batch": stage.global_batch,
        "per_chip_batch": stage.global_batch / len(devices),
        "remat": recipe.model.remat,
        "arguments_bytes": memory.arguments,
        "temporaries_bytes": memory.temporaries,
        "total_bytes": memory.total,
        "hbm_bytes": hbm,
        "hbm_available_bytes": memory.available,
        "fits": fits,
        "eval_total_bytes": None if evals is None else evals.total,
        "eval_fits": None if evals is None else evals.fits and evals.total <= hbm,
        "model_flops_per_chip": model_flops,
        "compiled_flops_per_chip": memory.compiled_flops,
        "step_time_bound_s": model_flops / peak if (peak := peak_flops(devices[0].device_kind)) else None,
    }


def plan(recipe: Recipe, tpu: tpu_types.TpuType, hbm: int | None = None) -> dict:
    """Every stage's figures on `tpu` (module docstring), from the cache when this recipe was planned for it; `hbm`:
    bytes per chip to plan against, when less than the chip's (room kept free)."""
    hbm = min(hbm or tpu.hbm_bytes, tpu.hbm_bytes)
    import jax

    check_devices(recipe, tpu.chips, tpu.hosts)
    cached = cache_path(recipe, tpu, hbm)
    if cached.exists():
        return json.loads(cached.read_text())
    devices = topology_devices(tpu)
    stages = [plan_stage(recipe, i, tpu, devices, hbm) for i in range(len(recipe.stages))]
    result = {
        "type": tpu.name,
        "topology": tpu.topology,
        "chips": tpu.chips,
        "hosts": tpu.hosts,
        "device_kind": devices[0].device_kind,
        "jax": jax.__version__,
        "stages": stages,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    temporary = cached.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(cached)  # whole or not at all: another plan may read it
    return result


def cache_path(recipe: Recipe, tpu: tpu_types.TpuType, hbm: int) -> Path:
    import jax

    key = json.dumps(
        [PLAN_FORMAT, dataclasses.asdict(recipe), tpu.name, hbm, jax.__version__, libtpu_version()],
        sort_keys=True,
        default=str,
    )
    root = os.environ.get("TPUCTL_PLAN_CACHE") or Path.home() / ".cache" / "tpuctl" / "plans"
    return Path(root) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def libtpu_version() -> str:
    """Which libtpu compiles: its package's version, or the library TPU_LIBRARY_PATH names (its size)."""
    from importlib import metadata

    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return f"{path} ({os.path.getsize(path)} bytes)"
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "none"


def refusal(result: dict) -> str | None:
    """One line naming the first stage that does not fit, what it needs and the ways to make it fit; None if all do."""
    for s in result["stages"]:
        if s["fits"] and s["eval_fits"] is not False:
            continue
        what = "its train step" if not s["fits"] else "its evals' encoder"
        need = s["total_bytes"] if not s["fits"] else s["eval_total_bytes"]
        ways = []
        if s["remat"] == "none":
            ways.append('model.remat = "block"')
        ways.append("mesh.fsdp > 1")
        ways.append("a smaller global_batch")
        hbm = s["hbm_available_bytes"] or s["hbm_bytes"]  # what the compiler said it had, where it said so
        return (
            f"stage {s['stage']} does not fit a {result['type']} chip: {what} needs {need / GIB:.2f} GiB of the"
            f" {hbm / GIB:.2f} GiB of HBM per chip; try {', '.join(ways)}"
        )
    return None


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"plan on {result['type']} ({result['chips']} chips of {result['device_kind']}, {result['hosts']} hosts)"
    table = Table(title=title)
    columns = ("stage", "res", "global batch", "per chip", "params + opt", "temporaries", "total / HBM", "fits")
    for column in (*columns, "model TFLOP / chip", "compiled TFLOP / chip", "bound"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in result["stages"]:
        refused = s["compiled_flops_per_chip"] is None
        table.add_row(
            s["stage"],
            str(s["resolution"]),
            str(s["global_batch"]),
            f"{s['per_chip_batch']:g}",
            f"{s['arguments_bytes'] / GIB:.2f} GiB",  # (where refused: the compiler's temporaries, our arguments)
            f"{s['temporaries_bytes'] / GIB:.2f} GiB",
            f"{s['total_bytes'] / GIB:.2f} / {s['hbm_bytes'] / GIB:.3g} GiB",
            ("yes" if s["fits"] else "[red]no[/]") + ("" if s["eval_fits"] is not False else " [red](evals no)[/]"),
            f"{s['model_flops_per_chip'] / 1e12:.2f}",
            "-" if refused else f"{s['compiled_flops_per_chip'] / 1e12:.2f}",
            "-" if s["step_time_bound_s"] is None else f"{1000 * s['step_time_bound_s']:.0f} ms",
        )
    console = Console()
    console.width = max(console.width, 150)  # a pipe's 80 columns would cut the stage names
    console.print(table)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--type", "accelerator_type", required=True, help="The pod's accelerator type, e.g. v4-256.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option(
    "--hbm-gib", type=float, help="Plan against this much HBM per chip (default: the chip's), keeping the rest free."
)
@click.option("--json", "as_json", is_flag=True, help="The plan as one JSON object on stdout.")
def main(
    recipe_path: str,
    accelerator_type: str,
    overrides: tuple[str, ...],
    hbm_gib: float | None,
    as_json: bool,
) -> None:
    """Compile every stage of RECIPE for a TPU type's topology here and show what each chip must hold."""
    # compile-only: nothing runs on a device, and this machine's own TPU (if any) is left alone; libtpu's lock on
    # the chips (/tmp/libtpu_lockfile) would refuse a second plan at once, or a plan beside a training run
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        tpu = tpu_types.parse(accelerator_type)
        recipe = load(recipe_path, list(overrides))
        result = plan(recipe, tpu, int(hbm_gib * GIB) if hbm_gib else None)
    except (RecipeError, tpu_types.UnknownType) as e:
        raise UserError(f"--type {e}" if isinstance(e, tpu_types.UnknownType) else str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        show(result)
    line = refusal(result)
    if line:
        click.echo(line, err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
