"""The device mesh and the ONE table that maps the models' logical axis names to mesh axes.

Mesh axes: data (batch only), fsdp (batch and parameters' embed axis), tensor (mlp, heads, vocab). OpenVision's
default is pure data parallelism (fsdp = tensor = 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer.models import variants
from trainer.recipe import Mesh as MeshConfig
from trainer.recipe import Recipe, RecipeError, check_devices

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (None: replicated). The models name their parameters' axes with these.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),  # the stacked blocks' leading axis
)


def mesh_shape(config: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); the one -1 takes the devices the others leave."""
    sizes = [config.data, config.fsdp, config.tensor]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % fixed:
            raise RecipeError(f"mesh: {device_count} devices do not split into fixed axes of {fixed}")
        sizes[sizes.index(-1)] = device_count // fixed
    if int(np.prod(sizes)) != device_count:
        raise RecipeError(
            f"mesh: data {sizes[0]} x fsdp {sizes[1]} x tensor {sizes[2]} = {int(np.prod(sizes))} is not the"
            f" {device_count} devices JAX sees"
        )
    return sizes[0], sizes[1], sizes[2]


def check_model_fits(recipe: Recipe, shape: tuple[int, int, int]) -> None:
    """Every sharded parameter axis must split evenly: heads, MLP and vocabulary over tensor, widths over fsdp."""
    _, fsdp, tensor = shape
    m = recipe.model
    towers = [
        ("model.image", f'"{m.image}"', variants.image_tower(m)),
        ("model.text", f'"{m.text}"', variants.text_tower(m)),
    ]
    if m.decoder:
        towers.append(("model.decoder", f'"{m.decoder}"', variants.TEXT[m.decoder]))
    for key, name, size in towers:
        for what, count, axis, ways in (
            ("heads", size.heads, "tensor", tensor),
            ("MLP width", size.mlp, "tensor", tensor),
            ("width", size.width, "fsdp", fsdp),
        ):
            if count % ways:
                raise RecipeError(f"mesh.{axis} = {ways} does not divide the {count} {what} of {key} = {name}")
    if recipe.text.vocab_rows % tensor:
        raise RecipeError(f"mesh.tensor = {tensor} does not divide text.vocab_rows = {recipe.text.vocab_rows}")


def checked_mesh(recipe: Recipe) -> Mesh:
    """The recipe's mesh over the devices JAX sees, after every check that needs them (batches split evenly over
    devices and hosts, the model's axes over the mesh): one line naming the key otherwise."""
    check_devices(recipe, jax.device_count(), jax.process_count())
    mesh = make_mesh(recipe.mesh)
    check_model_fits(recipe, mesh.devices.shape)
    return mesh


def make_mesh(config: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    devices = list(jax.devices()) if devices is None else devices
    shape = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a boxed tree from eval_shape (parameters, or a train state whose optimizer moments keep the
    parameters' boxes), from its logical axis names and the rules; unnamed leaves are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
