"""python -m trainer RECIPE --workdir DIR [--set key=value ...]

Runs every stage of the recipe in order; started again on the same workdir it resumes where it stopped. Exit status:
0 all stages done, or preempted (SIGTERM) after saving a checkpoint (the same command resumes); 2 a recipe or setup
error (one line on stderr); 1 anything else.
"""

from __future__ import annotations

import glob
import sys

import click

from trainer import contract
from trainer.errors import UserError
from trainer.recipe import RecipeError, load


def start_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None, heartbeat_timeout: int
) -> None:
    """Join the other hosts: explicitly (host:port of process 0), or on a Cloud TPU VM through JAX's own detection
    (worker list from the TPU metadata). Anywhere else, one process. A host silent for `heartbeat_timeout` seconds
    counts as dead and the others stop with an error (they would otherwise wait in a collective for ever)."""
    import jax

    if coordinator:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(
            coordinator,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
    elif any(glob.glob(pattern) for pattern in contract.TPU_DEVICE_GLOBS):
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option(
    "--workdir",
    help="Checkpoints, metrics, TensorBoard: a local path or gs://BUCKET/PATH (default: the recipe's workdir).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--coordinator", envvar=contract.COORDINATOR_ENV, help="host:port of process 0 (multi-process, no TPU).")
@click.option("--num-processes", envvar=contract.NUM_PROCESSES_ENV, type=int, help="With --coordinator.")
@click.option("--process-id", envvar=contract.PROCESS_ID_ENV, type=int, help="With --coordinator.")
@click.option(
    "--heartbeat-timeout",
    envvar=contract.HEARTBEAT_TIMEOUT_ENV,
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Seconds without a heartbeat after which a host counts as dead and the others stop.",
)
@click.option(
    "--compile-cache",
    envvar=contract.COMPILE_CACHE_ENV,
    help="Persistent XLA compilation cache, local or gs:// ('' = off; default: the recipe's compile_cache, else a"
    " compile_cache folder next to the workdir): a restart, a resume or another host skips recompiling.",
)
def main(
    recipe_path: str,
    workdir: str | None,
    overrides: tuple[str, ...],
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout: int,
    compile_cache: str | None,
) -> None:
    """Train the CLIP model of RECIPE, every stage, resuming from WORKDIR's checkpoints."""
    try:
        recipe = load(recipe_path, overrides)  # before jax starts: a typo costs a second, not a minute
    except RecipeError as e:
        raise UserError(str(e)) from None
    workdir = workdir or recipe.workdir
    if not workdir:
        raise UserError(f'{recipe_path}: no workdir (pass --workdir DIR, or set workdir = "gs://..." in the recipe)')
    from trainer import preflight, storage

    run_dir = storage.at(workdir)
    evaluators = preflight.check(recipe, run_dir)  # every path the recipe names, before compiling anything

    from trainer import compile_cache as xla_cache

    cache = xla_cache.location(compile_cache, recipe.compile_cache, workdir)
    if cache:
        xla_cache.enable(cache)
    start_distributed(coordinator, num_processes, process_id, heartbeat_timeout)
    from trainer import loop

    try:
        outcome = loop.run(recipe, run_dir, evaluators)
    except RecipeError as e:  # what depends on the devices: batch or mesh vs. the device count
        raise UserError(str(e)) from None
    if outcome.finished:
        click.echo(contract.finished_line(recipe_path, workdir))


if __name__ == "__main__":
    sys.exit(main())
