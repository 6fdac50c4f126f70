"""Cloud TPU accelerator types (`v4-256`, `v5litepod-16`, `v6e-64`, ...) -> what a slice of that type is: its chips,
the topology libtpu compiles for, its hosts, and each chip's HBM (its peak FLOP/s: trainer.hardware, by the device
kind the compiler's devices name).

From Google's pages for each generation (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): v4 and v5p name a slice by
its TensorCores (2 per chip; JAX sees one device per chip, "megacore") and lay chips out in a 3-D torus of 4-chip
hosts; v5e and v6e name it by its chips and lay them out in 2-D (one host of 8 chips up to v*-8, 4-chip hosts above).

Standard library only: tpuctl reads it too, and must not import jax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Generation:
    topology_prefix: str  # libtpu's name in a topology ("v5:4x4x8" is a v5p slice)
    cores_in_name: bool  # the type's number counts TensorCores (2 per chip), not chips
    chip_config: str  # libtpu's chip config: "megacore" (one device per chip) or "default"
    hbm_gib: float  # per chip
    shapes: dict[int, tuple[int, ...]]  # chips -> the documented slice shape


CUBES: dict[int, tuple[int, ...]] = {  # v4 and v5p slices, in chips
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    768: (8, 8, 12),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
    6144: (16, 16, 24),
}
PLANES: dict[int, tuple[int, ...]] = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}

GENERATIONS = {
    "v4": Generation("v4", True, "megacore", 32, CUBES),
    "v5p": Generation("v5", True, "megacore", 95, CUBES),
    "v5litepod": Generation("v5e", False, "default", 16, PLANES),
    "v5e": Generation("v5e", False, "default", 16, PLANES),
    "v6e": Generation("v6e", False, "default", 32, PLANES),
}


class UnknownType(ValueError):
    """An accelerator type this table cannot lay out, as one line saying what it knows."""


@dataclass(frozen=True)
class TpuType:
    name: str  # "v4-256"
    generation: Generation
    chips: int
    shape: tuple[int, ...]  # chips along each axis

    @property
    def topology(self) -> str:
        """As libtpu's get_topology_desc takes it: "v4:4x4x8"."""
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)

    @property
    def chips_per_host(self) -> int:
        return self.chips if self.chips <= 8 and len(self.shape) == 2 else min(4, self.chips)

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis (libtpu's chips_per_host_bounds)."""
        if self.chips_per_host == self.chips:
            return (*self.shape, 1) if len(self.shape) == 2 else self.shape  # type: ignore[return-value]
        return (2, 2, 1)

    @property
    def hbm_bytes(self) -> int:
        return int(self.generation.hbm_gib * GIB)


def parse(name: str) -> TpuType:
    """`v4-256` -> its slice. UnknownType names what is known for a type it cannot lay out."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if not match or match.group(1) not in GENERATIONS:
        raise UnknownType(f"{name!r} is not an accelerator type of {', '.join(GENERATIONS)} (e.g. v4-32, v6e-16)")
    generation = GENERATIONS[match.group(1)]
    count = int(match.group(2))
    chips = count // 2 if generation.cores_in_name else count
    if chips not in generation.shapes or (generation.cores_in_name and count % 2):
        sizes = [c * 2 if generation.cores_in_name else c for c in generation.shapes]
        raise UnknownType(
            f"{name}: no standard {match.group(1)} slice of that size; known: {', '.join(map(str, sizes))}"
        )
    return TpuType(name, generation, chips, generation.shapes[chips])
