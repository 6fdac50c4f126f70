"""The mesh and the logical-axis rules: shapes from the recipe, parameters laid out by the one rules table.

The 8-device check runs in a subprocess: XLA's host device count must be set before jax starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from standins import cpu_env

from trainer.recipe import Mesh, RecipeError
from trainer.sharding import mesh_shape


def test_mesh_shape_fills_the_minus_one():
    assert mesh_shape(Mesh(), 8) == (8, 1, 1)
    assert mesh_shape(Mesh(data=-1, fsdp=4), 8) == (2, 4, 1)
    assert mesh_shape(Mesh(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(Mesh(data=1), 1) == (1, 1, 1)
    with pytest.raises(RecipeError, match=r"^mesh: data 3 x fsdp 1 x tensor 1 = 3 is not the 8 devices JAX sees$"):
        mesh_shape(Mesh(data=3), 8)
    with pytest.raises(RecipeError, match=r"^mesh: 8 devices do not split into fixed axes of 3$"):
        mesh_shape(Mesh(data=-1, fsdp=3), 8)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    import flax.linen as nn
    from pathlib import Path
    from trainer import recipe, sharding
    from trainer.models.clip import build

    r = recipe.load(Path(sys.argv[1]), ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                  "model.image=S/16", "model.text=S", "model.decoder=''"])
    model = build(r)
    mesh = sharding.make_mesh(r.mesh)
    images, texts = jnp.ones((8, 16, 16, 3)), jnp.ones((8, 16), jnp.int32)
    init = lambda: model.init(jax.random.key(0), images, texts)
    abstract = jax.eval_shape(init)
    # compiled, not run: XLA takes the layout as the initialiser's output; drawing 34M random numbers would only
    # cost time (the trainer's own runs on fsdp meshes execute it)
    compiled = jax.jit(init, out_shardings=sharding.logical_shardings(abstract, mesh)).lower().compile()
    # each parameter's (spec, the shape of one device's shard)
    placed = lambda x, s: (list(s.spec), list(s.shard_shape(x.shape)))
    laid_out = nn.unbox(jax.tree.map(placed, abstract, compiled.output_shardings))["params"]
    fc1_spec, fc1_shard = laid_out["image"]["blocks"]["mlp"]["fc1"]["kernel"]
    emb_spec, emb_shard = laid_out["text"]["embedding"]["embedding"]
    batch = jax.device_put(images, sharding.batch_sharding(mesh))
    print(json.dumps({
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "fc1_spec": fc1_spec, "fc1_shard": fc1_shard, "emb_spec": emb_spec, "emb_shard": emb_shard,
        "scale_spec": laid_out["log_scale"][0],
        "batch_shard": list(batch.addressable_shards[0].data.shape),
    }))
    """
)


def test_parameters_and_batches_are_laid_out_by_the_rules():
    tiny = os.path.join(os.path.dirname(__file__), "tiny_synthetic.toml")
    # cold, not warm.run: the quick tier's only JAX subprocess, which would start a warm server importing TensorFlow
    args = [sys.executable, "-c", SCRIPT, tiny]
    r = subprocess.run(args, env=cpu_env(8), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8 and got["mesh"] == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}
    # image MLP kernels (layers 12, embed 384, mlp 1536): layers whole, embed over fsdp, mlp over tensor
    assert got["fc1_spec"] == [None, "fsdp", "tensor"] and got["fc1_shard"] == [12, 192, 768]
    # token table (vocab 32000, embed 384): vocab over tensor, embed over fsdp
    assert got["emb_spec"] == ["tensor", "fsdp"] and got["emb_shard"] == [16000, 192]
    assert got["scale_spec"] == []  # scalars replicated
    assert got["batch_shard"] == [2, 16, 16, 3]  # batch over data x fsdp = 4 ways


def test_the_model_must_split_evenly_over_the_mesh():
    from pathlib import Path

    from trainer import recipe
    from trainer.sharding import check_model_fits

    tiny = recipe.load(Path(__file__).resolve().parent / "tiny_synthetic.toml")
    check_model_fits(tiny, (8, 1, 1))
    check_model_fits(tiny, (1, 4, 1))  # widths 192 over 4
    with pytest.raises(RecipeError, match=r'^mesh.tensor = 2 does not divide the 3 heads of model.image = "Ti/8"$'):
        check_model_fits(tiny, (4, 1, 2))
    with pytest.raises(RecipeError, match=r'^mesh.fsdp = 5 does not divide the 192 width of model.image = "Ti/8"$'):
        check_model_fits(tiny, (1, 5, 1))
    b16 = recipe.load(Path(__file__).resolve().parents[1] / "recipes" / "b16.toml")
    check_model_fits(b16, (4, 4, 4))
    with pytest.raises(RecipeError, match=r'^mesh.tensor = 3 does not divide the 8 heads of model.text = "B"$'):
        check_model_fits(b16, (1, 1, 3))
