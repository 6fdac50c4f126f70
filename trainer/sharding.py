"""The device mesh and the ONE table that maps the models' logical axis names to mesh axes.

Mesh axes: dcn (the slices of a multi-slice job: batch only, over the data-centre network), data (batch only), fsdp
(batch and parameters' embed axis), tensor (mlp, heads, vocab). The recipe sizes data, fsdp and tensor within one
slice; dcn is the number of slices the devices come from. OpenVision's default is pure data parallelism
(fsdp = tensor = 1). The mesh follows the chips' physical layout (jax's mesh_utils), so the axes that talk most
(tensor, then fsdp) run along the torus's fastest links.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer.models import variants, vit
from trainer.recipe import Mesh as MeshConfig
from trainer.recipe import Recipe, RecipeError, check_devices

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

# Logical axis -> mesh axis (None: replicated). The models name their parameters' axes with these.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("dcn", "data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),  # the stacked blocks' leading axis
    # activations only (trainer/models/vit.py: constrain): their rows split like the batch, the rest whole, so
    # fsdp gathers a layer's weights rather than its activations
    ("length", None),
    ("act_embed", None),
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
    """Every sharded parameter axis must split evenly over (data, fsdp, tensor): heads, MLP and vocabulary over
    tensor, widths over fsdp."""
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
    check_model_fits(recipe, (mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"]))
    return mesh


def slice_count(devices: list[Any]) -> int:
    """The slices the devices come from (the TPU runtime numbers each device's slice; other devices are one)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(config: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    """(dcn, data, fsdp, tensor) over `devices` (all of JAX's by default), laid out on the chips' physical
    topology: mesh_utils places the inner axes on neighbouring chips, and on several slices the dcn axis across
    them (every other axis stays inside a slice)."""
    devices = list(jax.devices()) if devices is None else devices
    slices = slice_count(devices)
    if len(devices) % slices:
        raise RecipeError(f"mesh: {len(devices)} devices do not split evenly over their {slices} slices")
    inner = (1, *mesh_shape(config, len(devices) // slices))
    try:
        if slices == 1:
            grid = mesh_utils.create_device_mesh(inner, devices, allow_split_physical_axes=True)
        else:
            grid = mesh_utils.create_hybrid_device_mesh(
                inner, (slices, 1, 1, 1), devices, allow_split_physical_axes=True
            )
    except (ValueError, NotImplementedError, AssertionError) as e:
        sizes = " x ".join(f"{n} {s}" for n, s in zip(MESH_AXES[1:], inner[1:], strict=True))
        raise RecipeError(f"mesh: {sizes} does not lay out on these devices' physical topology ({e})") from None
    return Mesh(grid, MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a boxed tree from eval_shape (parameters, or a train state whose optimizer moments keep the
    parameters' boxes), from its logical axis names and the rules; unnamed leaves are replicated."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


@contextlib.contextmanager
def activation_layout(mesh: Mesh) -> Iterator[None]:
    """Inside a traced step: the models' activation constraints take effect on `mesh` by the rules above."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), vit.activation_rules(LOGICAL_RULES):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("dcn", "data", "fsdp")))
