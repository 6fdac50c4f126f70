"""Data parallelism's replicas made explicit inside a traced step, so grad_accum all-reduces its gradient once a step.

Under jit a gradient summed over the batch is all-reduced where it is formed: a scan over micro-batches all-reduces
every weight's gradient once a micro-batch (XLA does not move a collective out of a loop). Here the parameters take
a leading axis, one copy per replica, split over the mesh axes that split the batch and no parameter (dcn, data), and
each replica's rows run through its own copy (vmap): each replica's gradient is then its slice of that axis, the scan
adds them up where they lie, and the step sums the axis once, after the scan: one all-reduce. The fsdp axis splits
the parameters too: its reduce-scatter stays once a micro-batch (holding unreduced gradients would cost the memory
FSDP saves), as in every FSDP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from trainer.models import vit


def _axes(value: Any) -> tuple[str, ...]:
    return tuple(a for a in (value if isinstance(value, tuple) else (value,)) if a is not None)


@dataclasses.dataclass(frozen=True)
class Replicas:
    axes: tuple[str, ...]  # the mesh axes that split the batch and no parameter
    count: int  # replicas: the product of their sizes
    inner_rules: Any  # the activation rules inside one replica: its rows split over the batch's other axes

    @staticmethod
    def of_active_mesh() -> Replicas | None:
        """The replicas of the step being traced (trainer.sharding.activation_layout), None without a mesh or with
        one replica."""
        rules, mesh = vit.active_rules(), jax.sharding.get_abstract_mesh()
        if rules is None or mesh.empty:
            return None
        batch = _axes(dict(rules)["batch"])
        splits_parameters = {a for name, value in rules if name != "batch" for a in _axes(value)}
        axes = tuple(a for a in batch if a not in splits_parameters)
        count = math.prod(mesh.shape[a] for a in axes)
        if count == 1:
            return None
        rest = tuple(a for a in batch if a not in axes) or None
        inner = tuple((name, rest if name == "batch" else value) for name, value in rules)
        return Replicas(axes, count, inner)

    def stack(self, tree: Any) -> Any:
        """Every leaf with a leading axis of one copy per replica, that axis split over the replicas' devices."""

        def copies(x: jnp.ndarray) -> jnp.ndarray:
            x = jnp.broadcast_to(x, (self.count, *x.shape))
            return jax.lax.with_sharding_constraint(x, P(self.axes, *[P.UNCONSTRAINED] * (x.ndim - 1)))

        return jax.tree.map(copies, tree)

    def run(self, f: Callable[..., Any], stacked: Any, batch: dict[str, jnp.ndarray], key: jax.Array | None) -> Any:
        """f(parameters, rows, key) on each replica's copy and its own rows (a batch's rows are split over the
        replicas in order: (B, ...) -> (count, B / count, ...)), the key folded with the replica's index; the
        outputs keep the replicas' leading axis."""
        rows = {k: v.reshape(self.count, v.shape[0] // self.count, *v.shape[1:]) for k, v in batch.items()}
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(self.count))
        with vit.activation_rules(self.inner_rules):
            return jax.vmap(f, spmd_axis_name=self.axes)(stacked, rows, keys)


def merge_rows(x: jnp.ndarray) -> jnp.ndarray:
    """(count, rows, ...) -> (count * rows, ...): the replicas' rows back in the batch's order."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
