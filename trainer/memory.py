"""What a compiled program holds per device: the compiler's own figures (arguments, temporaries, peak), or where it
refused the program for want of memory, what it said it needed. The plan (libtpu, for a TPU topology) and the
trainer's remat = "auto" (on the devices it has) both measure the train step this way."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from trainer.recipe import Recipe, Stage

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
    return of_compiled(compiled)


def of_compiled(compiled: Any) -> Memory:
    """A compiled program's memory and FLOPs per device, by the compiler's own analysis."""
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


def train_step_args(recipe: Recipe, stage: Stage, mesh: Any) -> tuple[Any, Any, Any]:
    """The stage's jitted train step as the trainer builds it for `mesh`, and its abstract arguments (the state, and
    the global batch as the loop feeds it)."""
    import jax

    from trainer.models.clip import build
    from trainer.program import compile_stage, example_batch

    program = compile_stage(build(recipe), recipe, stage, mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.batch_sharding)
        for k, v in example_batch(recipe, stage, stage.global_batch).items()
    }
    return program.step, program.abstract_state, batch


def train_memory(recipe: Recipe, stage: Stage, mesh: Any) -> Memory:
    """The stage's train step, compiled for `mesh` as the trainer compiles it."""
    return compile_memory(*train_step_args(recipe, stage, mesh))
