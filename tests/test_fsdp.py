"""FSDP that is FSDP: the train step compiled for data 2 x fsdp 4 on 8 CPU devices, its collectives read from the
compiled HLO. Every layer gathers its weights and reduce-scatters (or all-reduces) their gradients; activations stay
split by rows: none is all-reduced inside a layer, no image or token batch is gathered. Parameters and optimizer state
are split 4 ways.

The compile runs in a subprocess: XLA's host device count must be set before jax starts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from standins import cpu_env

from trainer import collectives

TESTS = os.path.dirname(os.path.abspath(__file__))  # on the scripts' path: their standins
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
    found = collectives.of(got["hlo"])
    assert any(c.kind == "all-gather" and "/while/body/" in c.name for c in found)  # weights, layer by layer
    embed_dim = 384
    for c in found:
        for shape in c.shapes:
            if "/while/body/" in c.name:  # inside a layer: only weights and their gradients move
                assert shape in weights, (c.kind, shape, c.name)
            else:  # outside: weights, or per-example features and values (the losses' (batch, embed_dim) at most)
                per_example = len(shape) <= 2 and math.prod(shape) <= GLOBAL_BATCH * embed_dim
                assert shape in weights or per_example, (c.kind, shape, c.name)

    # parameters and optimizer state: a quarter of them per device (the few small leaves fsdp does not split aside)
    total = sum(n * math.prod(full) for full, _, n in got["leaves"])
    per_device = sum(n * math.prod(shard) for _, shard, n in got["leaves"])
    assert total / 4 <= per_device <= 1.03 * total / 4, (per_device, total)


ACCUMULATE_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    from pathlib import Path
    import jax, numpy as np, optax
    from standins.params import random_params
    from trainer import recipe, sharding
    from trainer.models.clip import build
    from trainer.step import init_state, train_step

    r = recipe.load(Path(sys.argv[1]), sys.argv[4:])
    mesh, stage, model = sharding.checked_mesh(r), r.stages[0], build(r)
    rng, rows = np.random.default_rng(0), stage.global_batch
    captions = rng.integers(3, 30_000, size=(rows, r.text.caption_length)).astype(np.int32)
    captions[:, 5:] = 0
    captions[2, 2:] = 0  # unequal token counts: a replica's mean is not the batch's
    batch = {"images": rng.normal(size=(rows, stage.resolution, stage.resolution, 3)).astype(np.float32),
             "texts": rng.integers(3, 30_000, size=(rows, r.text.context_length)).astype(np.int32),
             "captions": captions}
    firsts = [v[:1] for v in batch.values()]
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *firsts))
    params = random_params(model, *firsts)["params"]
    tx = optax.sgd(1.0)  # new params = params - the step's gradient
    shardings = sharding.logical_shardings(jax.eval_shape(lambda: init_state(boxed["params"], tx)), mesh)

    def run(s):
        def laid_out(state, b):
            with sharding.activation_layout(mesh):
                return train_step(model, r, s, tx, state, b)
        state = jax.device_put(init_state(params, tx), shardings)
        b = jax.device_put(batch, sharding.batch_sharding(mesh))
        compiled = jax.jit(laid_out).lower(state, b).compile()
        (new, metrics), hlo = compiled(state, b), compiled.as_text()
        return [np.asarray(x) for x in jax.tree.leaves(new.params)], {k: float(v) for k, v in metrics.items()}, hlo

    accumulated, metrics, hlo = run(stage)
    whole, whole_metrics, _ = run(dataclasses.replace(stage, grad_accum=1))
    np.savez(sys.argv[2], *accumulated)
    np.savez(sys.argv[3], *whole)
    reductions = [line for line in hlo.splitlines() if "reduce" in line]
    print(json.dumps({"metrics": metrics, "whole_metrics": whole_metrics, "hlo": reductions,
                      "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))}))
    """
)


@pytest.mark.slow  # two compiles on 8 devices: 20 s
def test_grad_accum_all_reduces_the_gradient_once_and_keeps_the_whole_batch_s_update(tmp_path):
    """data 4 x fsdp 2, grad_accum 2: inside the accumulation loop no reduction crosses the data axis but the loss's
    few numbers (fsdp's, 2 devices, reduce the weights' gradients there, as FSDP must); after it one reduction
    carries every gradient across the replicas. The update is grad_accum 1's (sigmoid loss with its bias, the caption
    decoder's token-weighted mean)."""
    tiny = os.path.join(os.path.dirname(__file__), "tiny_synthetic.toml")
    overrides = [
        *("mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1", "loss.contrastive='sigmoid'"),
        *("model.image=Ti/8", "text.context_length=8", "text.caption_length=8"),
        *("stages.0.global_batch=16", "stages.0.grad_accum=2", "stages.0.warmup_steps=0"),
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            ACCUMULATE_SCRIPT,
            tiny,
            tmp_path / "accumulated.npz",
            tmp_path / "whole.npz",
            *overrides,
        ],
        env=cpu_env(8) | {"PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    accumulated, whole = np.load(tmp_path / "accumulated.npz"), np.load(tmp_path / "whole.npz")
    assert len(accumulated.files) == len(whole.files) > 0
    for leaf in whole.files:
        np.testing.assert_allclose(accumulated[leaf], whole[leaf], rtol=2e-4, atol=2e-6, err_msg=leaf)
    for name, value in got["whole_metrics"].items():
        np.testing.assert_allclose(got["metrics"][name], value, rtol=2e-4, err_msg=name)

    fsdp, micro_rows = 2, 8
    across_data_after, in_loop = 0, 0
    for c in collectives.of("\n".join(got["hlo"])):
        if c.kind not in ("all-reduce", "reduce-scatter"):
            continue
        assert c.group is not None, c
        if "accumulate" in c.name:
            in_loop += 1
            assert c.group <= fsdp or c.largest <= micro_rows, c  # no gradient crosses the replicas in the loop
        elif c.group > fsdp:
            across_data_after += sum(math.prod(s) for s in c.shapes)
    assert in_loop > 0  # the loop is found (its fsdp reductions)
    assert across_data_after >= got["params"] / fsdp  # the one reduction of the replicas' gradients


SCAN_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))

    def loss(x, w):
        return jax.lax.scan(lambda c, layer: (jnp.tanh(c @ layer), None), x, w)[0].sum()

    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))
    print(jax.jit(jax.grad(loss, argnums=1)).lower(x, jnp.ones((5, 16, 16))).compile().as_text())
    """
)


def test_collectives_are_read_with_their_groups_sizes_and_the_loops_around_them():
    """A 5-layer scan's weight gradient, its rows split over 4 devices: one all-reduce of a (16, 16) layer among the
    4, run 5 times (the scan's trip count)."""
    r = subprocess.run([sys.executable, "-c", SCAN_SCRIPT], env=cpu_env(4), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    found = collectives.of(r.stdout)
    assert [(c.kind, c.shapes, c.bytes, c.group, c.runs) for c in found] == [("all-reduce", [(16, 16)], 1024, 4, 5)]
