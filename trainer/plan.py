"""python -m trainer.plan RECIPE --type v4-256 [--set KEY=VALUE ...] [--hbm-gib G] [--json]

Whether each stage of a recipe fits its pod, before the pod is paid for. Every stage's train step (the one
`python -m trainer` runs: the same model, optimizer, shardings and donation) and its evals' encoders are compiled
by the real TPU compiler, libtpu (the `tpu` extra), for the accelerator type's topology, on this machine and with no
TPU. Per stage: what one chip holds (parameters and optimizer state, the step's temporaries and outputs) against its
HBM, whether it fits (the compiler's word, and where it refuses, what it needed), the remat "auto" chose, and the
step's FLOPs per chip: the model's, and the traced step's (every layer, the recomputation included: the cost of
remat), against the chip's peak. The memory figures are the compiler's own, the ones a pod fails on
(RESOURCE_EXHAUSTED); the time is only a bound (FLOPs over peak), never a promise.

Plans are cached by the recipe, the type, the jax and libtpu versions and the trainer's code (TPUCTL_PLAN_CACHE, else
~/.cache/tpuctl/plans). Exit status: 0 every stage fits, 1 one does not (named, with the ways to make it fit), 2 a
recipe or flag mistake.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from trainer import tpu_types
from trainer.errors import UserError
from trainer.memory import Memory, compile_memory, train_memory, train_step_args
from trainer.recipe import Recipe, RecipeError, Stage, check_devices, load

PLAN_FORMAT = 4  # bump when a plan's fields change: older cached plans are then compiled again
GIB = tpu_types.GIB


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


def largest_batch(recipe: Recipe, stage: Stage, mesh: Any, fits: Callable[[Memory], bool]) -> int:
    """The largest global batch whose train step fits (0: not even one row a device), searched by compiling. Batches
    step by the devices' count (times grad_accum: each micro-batch splits evenly)."""
    unit = len(mesh.devices.flat) * stage.grad_accum

    def fits_at(units: int) -> bool:
        probe = dataclasses.replace(stage, global_batch=units * unit)
        return fits(train_memory(dataclasses.replace(recipe, stages=(probe,)), probe, mesh))

    return search_largest(max(1, stage.global_batch // unit), fits_at) * unit


def search_largest(start: int, fits: Callable[[int], bool], most: int = 64) -> int:
    """The largest n >= 1 with fits(n) (fits falls as n grows), to within 1/16 below it, else 0: doubled (or halved)
    from `start` until the answer changes (at most `most` x start), then the interval halved. Each fits() is asked
    once per n (a compile each)."""
    answers: dict[int, bool] = {}

    def ask(n: int) -> bool:
        if n not in answers:
            answers[n] = fits(n)
        return answers[n]

    if ask(start):
        low, high = start, start * 2
        while ask(high):
            if high >= start * most:
                return high
            low, high = high, high * 2
    else:
        low, high = start // 2, start
        while low >= 1 and not ask(low):
            low, high = low // 2, low
        if low < 1:
            return 0
    while high - low > max(1, low // 16):
        middle = (low + high) // 2
        low, high = (middle, high) if ask(middle) else (low, middle)
    return low


def plan_stage(
    recipe: Recipe, index: int, tpu: tpu_types.TpuType, devices: list[Any], hbm: int, search: bool = False
) -> dict:
    from trainer import fitting, sharding
    from trainer.hardware import peak_flops
    from trainer.models import flops

    stage = recipe.stages[index]
    mesh = sharding.make_mesh(recipe.mesh, devices)
    fits_chip = lambda m: m.fits and m.total <= hbm  # noqa: E731 (the compiler refuses what does not fit at all)
    # remat "auto": the least recomputation that fits, as the trainer chooses it on the pod
    tried: list[tuple[Recipe, Memory]] = []
    chosen, memory = fitting.choose(recipe, lambda r: train_memory(r, stage, mesh), fits_chip, tried, stage)
    evals = eval_memory(recipe, stage, devices)
    fits = fits_chip(memory)
    step_flops = flops.traced(*train_step_args(chosen, stage, mesh)) / len(devices)  # every layer, remat included
    model_flops = flops.train_per_sample(recipe, stage) * stage.global_batch / len(devices)
    largest = largest_batch(chosen, stage, mesh, fits_chip) if search else None
    return {
        "stage": stage.name,
        "resolution": stage.resolution,
        "global_batch": stage.global_batch,
        "per_chip_batch": stage.global_batch / len(devices),
        "remat": fitting.describe(chosen),
        "remat_auto": recipe.model.remat == "auto",
        "remat_tried": [  # what "auto" compiled before its choice, in order (the choice last)
            {"remat": fitting.describe(r), "total_bytes": m.total, "fits": fits_chip(m)} for r, m in tried
        ],
        "arguments_bytes": memory.arguments,
        "temporaries_bytes": memory.temporaries,
        "total_bytes": memory.total,
        "hbm_bytes": hbm,
        "hbm_available_bytes": memory.available,
        "fits": fits,
        "eval_total_bytes": None if evals is None else evals.total,
        "eval_fits": None if evals is None else evals.fits and evals.total <= hbm,
        "model_flops_per_chip": model_flops,
        "step_flops_per_chip": step_flops,
        "step_time_bound_s": model_flops / peak if (peak := peak_flops(devices[0].device_kind)) else None,
        "largest_global_batch": largest,  # (with --largest-batch) at the remat chosen
    }


def plan(recipe: Recipe, tpu: tpu_types.TpuType, hbm: int | None = None, search: bool = False) -> dict:
    """Every stage's figures on `tpu` (module docstring), from the cache when this recipe was planned for it; `hbm`:
    bytes per chip to plan against, when less than the chip's (room kept free); `search`: also each stage's largest
    global batch that fits (several compiles a stage)."""
    hbm = min(hbm or tpu.hbm_bytes, tpu.hbm_bytes)
    import jax

    check_devices(recipe, tpu.chips, tpu.hosts)
    cached = cache_path(recipe, tpu, hbm, search)
    if cached.exists():
        return json.loads(cached.read_text())
    devices = topology_devices(tpu)
    stages = [plan_stage(recipe, i, tpu, devices, hbm, search) for i in range(len(recipe.stages))]
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


def cache_path(recipe: Recipe, tpu: tpu_types.TpuType, hbm: int, search: bool = False) -> Path:
    import jax

    key = json.dumps(
        [PLAN_FORMAT, dataclasses.asdict(recipe), tpu.name, hbm, search, jax.__version__, libtpu_version(), code()],
        sort_keys=True,
        default=str,
    )
    root = os.environ.get("TPUCTL_PLAN_CACHE") or Path.home() / ".cache" / "tpuctl" / "plans"
    return Path(root) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


@functools.cache
def code() -> str:
    """The trainer's own code, hashed: a plan compiled the step this code builds, so a changed model, loss or remat
    is planned again rather than served from the cache."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


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
        if s["remat"] != "block":  # (auto tries block last)
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
    columns: tuple[str, ...] = ("stage", "res", "global batch", "per chip", "remat", "params + opt", "temporaries")
    columns += ("total / HBM", "fits")
    searched = any(s["largest_global_batch"] is not None for s in result["stages"])
    columns += ("model TFLOP / chip", "step TFLOP / chip", "bound") + (("largest batch",) if searched else ())
    for column in columns:
        table.add_column(column, justify="left" if column == "stage" else "right")
    for s in result["stages"]:
        table.add_row(
            s["stage"],
            str(s["resolution"]),
            str(s["global_batch"]),
            f"{s['per_chip_batch']:g}",
            s["remat"] + (" (auto)" if s["remat_auto"] else ""),
            f"{s['arguments_bytes'] / GIB:.2f} GiB",  # (where refused: the compiler's temporaries, our arguments)
            f"{s['temporaries_bytes'] / GIB:.2f} GiB",
            f"{s['total_bytes'] / GIB:.2f} / {s['hbm_bytes'] / GIB:.3g} GiB",
            ("yes" if s["fits"] else "[red]no[/]") + ("" if s["eval_fits"] is not False else " [red](evals no)[/]"),
            f"{s['model_flops_per_chip'] / 1e12:.2f}",
            f"{s['step_flops_per_chip'] / 1e12:.2f}",
            "-" if s["step_time_bound_s"] is None else f"{1000 * s['step_time_bound_s']:.0f} ms",
            *((str(s["largest_global_batch"]),) if searched else ()),
        )
    console = Console()
    console.width = max(console.width, 180)  # a pipe's 80 columns would cut the stage names
    console.print(table)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--type", "accelerator_type", required=True, help="The pod's accelerator type, e.g. v4-256.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option(
    "--hbm-gib", type=float, help="Plan against this much HBM per chip (default: the chip's), keeping the rest free."
)
@click.option(
    "--largest-batch", is_flag=True, help="Also search each stage's largest global batch that fits (more compiles)."
)
@click.option("--json", "as_json", is_flag=True, help="The plan as one JSON object on stdout.")
def main(
    recipe_path: str,
    accelerator_type: str,
    overrides: tuple[str, ...],
    hbm_gib: float | None,
    largest_batch: bool,
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
        result = plan(recipe, tpu, int(hbm_gib * GIB) if hbm_gib else None, largest_batch)
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
