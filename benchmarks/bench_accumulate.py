"""grad_accum's communication and memory, compiled by libtpu for a TPU topology on this machine (no TPU).

    python benchmarks/bench_accumulate.py [RECIPE] [--type v4-8] [--accum 1 --accum 2 --accum 4] [--set KEY=VALUE]
        [--json]

For each grad_accum, the recipe's first stage (at its global batch) compiled as the trainer compiles it
(trainer.memory.train_step_args), twice: "replicas" (the trainer: each replica's gradient summed where it lies, one
all-reduce after the accumulation loop, trainer/replicas.py) and "per micro-batch" (the same step with the replicas
turned off: the gradient reduced as jit places it, inside the loop). From the compiled HLO (trainer.collectives):
the bytes a step reduces across the replicas (all-reduces and reduce-scatters whose groups span more devices than
fsdp x tensor), each times the runs of the loops around it (the layers' scan, the accumulation loop: their trip
counts in the HLO), inside the accumulation loop and outside it; and libtpu's peak memory per chip (a program that
does not fit stops the run with libtpu's refusal). grad_accum 1 has no accumulation loop: its row is the floor.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from unittest import mock

import click
from rich.console import Console
from rich.table import Table

GIB = 1024**3


def measure(recipe_path: Path, tpu_type: str, accum: int, overrides: list[str], replicas: bool) -> dict:
    import jax

    from trainer import collectives, plan, recipe, sharding, tpu_types
    from trainer.memory import of_compiled, train_step_args
    from trainer.replicas import Replicas

    tpu = tpu_types.parse(tpu_type)
    r = recipe.load(recipe_path, overrides)
    stage = dataclasses.replace(r.stages[0], grad_accum=accum)
    mesh = sharding.make_mesh(r.mesh, plan.topology_devices(tpu))
    inside_replica = mesh.shape["fsdp"] * mesh.shape["tensor"]
    with mock.patch.object(Replicas, "of_active_mesh", Replicas.of_active_mesh if replicas else lambda: None):
        step, state, batch = train_step_args(r, stage, mesh)
        started = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        seconds = time.perf_counter() - started
    memory, hlo = of_compiled(compiled), compiled.as_text()
    in_loop = after = 0
    for c in collectives.of(hlo):
        if c.kind in ("all-reduce", "reduce-scatter") and (c.group or 0) > inside_replica:
            if "accumulate" in c.name:
                in_loop += c.bytes * c.runs
            else:
                after += c.bytes * c.runs
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    return {
        "grad_accum": accum,
        "mode": "replicas" if replicas else "per micro-batch",
        "mesh": dict(mesh.shape),
        "reduced_in_loop_gb": in_loop / 1e9,
        "reduced_after_gb": after / 1e9,
        "reduced_per_step_gb": (in_loop + after) / 1e9,
        "parameters_gb": params / 1e9,
        "peak_gib": memory.total / GIB,
        "compile_s": seconds,
    }


@click.command()
@click.argument("recipe_path", default="recipes/tiny.toml", type=click.Path(exists=True, path_type=Path))
@click.option("--type", "tpu_type", default="v4-8", show_default=True)
@click.option("--accum", "accums", multiple=True, type=int, default=(1, 2, 4), show_default=True)
@click.option("--set", "overrides", multiple=True, help="recipe overrides, KEY=VALUE")
@click.option("--json", "as_json", is_flag=True)
def main(recipe_path: Path, tpu_type: str, accums: tuple[int, ...], overrides: tuple[str, ...], as_json: bool) -> None:
    rows = []
    for accum in accums:
        for replicas in (False, True) if accum > 1 else (True,):
            rows.append(measure(recipe_path, tpu_type, accum, list(overrides), replicas))
    if as_json:
        click.echo(json.dumps({"recipe": str(recipe_path), "type": tpu_type, "overrides": overrides, "rows": rows}))
        return
    table = Table(title=f"{recipe_path} on {tpu_type} (libtpu compile), mesh {rows[0]['mesh']}")
    for column in ("grad_accum", "gradient", "GB reduced a step (in loop + after)", "parameters GB", "peak GiB/chip"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["grad_accum"]),
            row["mode"],
            f"{row['reduced_per_step_gb']:.3f} ({row['reduced_in_loop_gb']:.3f} + {row['reduced_after_gb']:.3f})",
            f"{row['parameters_gb']:.3f}",
            f"{row['peak_gib']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
