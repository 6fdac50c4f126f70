"""FSDP that is FSDP: the train step compiled for data 2 x fsdp 4 on 8 CPU devices, its collectives read from the
compiled HLO. Every layer gathers its weights and reduce-scatters (or all-reduces) their gradients; activations stay
split by rows: none is all-reduced inside a layer, no image or token batch is gathered. Parameters and optimizer state
are split 4 ways.

The compile runs in a subprocess: XLA's host device count must be set before jax starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

from standins import cpu_env

GLOBAL_BATCH = 40  # 5 rows a device: a size no parameter has, so a gathered or reduced activation shows by its shape

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax
    import flax.linen as nn
    from trainer import recipe, sharding, program
    from trainer.models.clip import build

    r = recipe.load(Path(sys.argv[1]), sys.argv[2:])
    mesh = sharding.checked_mesh(r)
    stage = r.stages[0]
    prog = program.compile_stage(build(r), r, stage, mesh)
    batch = {k: jax.ShapeDtypeStruct((stage.global_batch, *v.shape[1:]), v.dtype, sharding=prog.batch_sharding)
             for k, v in program.example_batch(r, stage).items()}
    compiled = prog.step.lower(prog.abstract_state, batch).compile()
    leaves = [(x.shape, s.shard_shape(x.shape), x.dtype.itemsize)
              for x, s in zip(jax.tree.leaves(prog.abstract_state), jax.tree.leaves(prog.state_shardings))]
    print(json.dumps({"hlo": compiled.as_text(), "leaves": leaves, "mesh": dict(mesh.shape)}))
    """
)

# `%name = SHAPE(S) all-gather(...)` (one result or a tuple of them), with the op's name in its metadata
COLLECTIVE = re.compile(r"= (\([^)]*\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(.*")
DIMS = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]], str]]:
    """(kind, the result shapes, the op's name) of each cross-device collective in the compiled program."""
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in DIMS.findall(m.group(1))]
            name = re.search(r'op_name="([^"]*)"', line)
            found.append((m.group(2), shapes, name.group(1) if name else ""))
    return found


def test_fsdp_gathers_weights_never_activations_and_splits_the_state(tmp_path):
    tiny = os.path.join(os.path.dirname(__file__), "tiny_synthetic.toml")
    overrides = [
        *("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"),
        *("model.image=S/16", "model.text=S", "model.decoder=S"),  # widths 384: split 4 ways
        f"stages.0.global_batch={GLOBAL_BATCH}",
        "stages.0.resolution=32",
    ]
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, tiny, *overrides], env=cpu_env(8), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Involuntary full rematerialization" not in r.stderr  # XLA replicating a tensor to re-split it
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["mesh"] == {"dcn": 1, "data": 2, "fsdp": 4, "tensor": 1}

    # every shape a weight or its gradient can have on the wire: whole, one layer of a stack, or either split
    weights = set()
    for full, shard, _ in got["leaves"]:
        for shape in (full, shard):
            weights |= {tuple(shape), tuple(shape[1:])}
    found = collectives(got["hlo"])
    assert any(kind == "all-gather" and "/while/body/" in name for kind, _, name in found)  # weights, layer by layer
    embed_dim = 384
    for kind, shapes, name in found:
        for shape in shapes:
            if "/while/body/" in name:  # inside a layer: only weights and their gradients move
                assert shape in weights, (kind, shape, name)
            else:  # outside: weights, or per-example features and values (the losses' (batch, embed_dim) at most)
                per_example = len(shape) <= 2 and _prod(shape) <= GLOBAL_BATCH * embed_dim
                assert shape in weights or per_example, (kind, shape, name)

    # parameters and optimizer state: a quarter of them per device (the few small leaves fsdp does not split aside)
    total = sum(n * _prod(full) for full, _, n in got["leaves"])
    per_device = sum(n * _prod(shard) for _, shard, n in got["leaves"])
    assert total / 4 <= per_device <= 1.03 * total / 4, (per_device, total)


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
