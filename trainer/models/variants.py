"""OpenVision's model sizes, in one place. Everything else asks this table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Size:
    width: int
    depth: int
    mlp: int
    heads: int


# Image towers (ViT): width / depth / MLP / heads.
IMAGE = {
    "Mu": Size(96, 3, 384, 3),  # not OpenVision's: a CPU-sized tower for the demo and tests
    "Ti": Size(192, 12, 768, 3),
    "S": Size(384, 12, 1536, 6),
    "B": Size(768, 12, 3072, 12),
    "L": Size(1024, 24, 4096, 16),
    "So400m": Size(1152, 27, 4304, 16),
    "H": Size(1280, 32, 5120, 16),
}

# Text encoders and caption decoders share one table of shapes per variant (OpenVision's decoder variants;
# the CLIP text towers B/L/H have the same widths).
TEXT = {
    "Mu": Size(96, 2, 384, 3),
    "Ti": Size(192, 12, 768, 3),
    "S": Size(384, 12, 1536, 6),
    "B": Size(512, 12, 2048, 8),
    "L": Size(768, 12, 3072, 12),
    "So400m": Size(1152, 27, 4304, 16),
    "H": Size(1024, 24, 4096, 16),
}

# Width of the shared image-text embedding, by image variant.
EMBED_DIM = {"Mu": 96, "Ti": 192, "S": 384, "B": 512, "L": 768, "So400m": 1152, "H": 1024}


def image_tower(model: Any) -> Size:
    """The image tower's shape: the variant's, with `model.image_depth` layers where the recipe sets it."""
    size = IMAGE[model.image_variant]
    return replace(size, depth=model.image_depth) if model.image_depth else size


def text_tower(model: Any) -> Size:
    """The text tower's shape: the variant's, with `model.text_depth` layers where the recipe sets it."""
    size = TEXT[model.text]
    return replace(size, depth=model.text_depth) if model.text_depth else size
