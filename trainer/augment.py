"""Augmentation done on the device, inside the jitted step: colour jitter.

The host draws each sample's jitter (6 uniforms, `colour` in the batch, seeded per sample like its crop) and the
device applies it. As one affine colour map per image (a (3, 3) matrix and an offset), jitter is 9 multiply-adds per
pixel next to a ViT's millions, where on the host it cost the input pipeline a third of its throughput at 224 px.

SimCLR-style, as OpenVision: with p 0.8 brightness (+-0.8 s), contrast and saturation (x [1 - 0.8 s, 1 + 0.8 s]) and
hue (+-0.2 s turns: a rotation of the chroma plane in YIQ), in that order; then with p 0.2 grayscale; s = strength.
Every step is affine in the colour, so they compose into one map with one clip at the end (tf.image's per-op
versions clip after each op and take hue and saturation through HSV; the distributions are the same in kind).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601: grayscale, and the Y of YIQ
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
GREY = np.ones((3, 1), np.float32) * LUMA[None]  # every channel := the luma


def colour_maps(draws: jnp.ndarray, mean_rgb: jnp.ndarray, strength: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(B, 6) uniforms in [0, 1) (brightness, contrast, saturation, hue, jitter?, grayscale?; drawn by
    trainer.data.preprocess.colour_draws) and each image's mean colour (B, 3), pixel units -> (B, 3, 3) matrices, (B, 3)
    offsets of the composed map x -> M x + b."""
    u = draws.astype(jnp.float32)
    batch = u.shape[0]
    eye = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (batch, 3, 3))

    def then(m: jnp.ndarray, b: jnp.ndarray, maps: tuple[jnp.ndarray, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
        matrix, offset = maps
        return m @ matrix, jnp.einsum("bij,bj->bi", m, offset) + b

    spread = 0.8 * strength
    brightness = (2 * u[:, 0] - 1) * spread * 255.0
    contrast = 1 + (2 * u[:, 1] - 1) * spread
    saturation = 1 + (2 * u[:, 2] - 1) * spread
    angle = (2 * u[:, 3] - 1) * 0.2 * strength * 2 * np.pi
    maps = (eye, jnp.broadcast_to(brightness[:, None], (batch, 3)))
    # contrast about the image's mean grey level at this point (the mean of an affine map is the map of the mean)
    mean_grey = jnp.einsum("c,bc->b", LUMA, jnp.einsum("bij,bj->bi", maps[0], mean_rgb) + maps[1])
    maps = then(contrast[:, None, None] * eye, ((1 - contrast) * mean_grey)[:, None] * jnp.ones(3), maps)
    maps = then(saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * GREY, jnp.zeros((batch, 3)), maps)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    zero, one = jnp.zeros_like(angle), jnp.ones_like(angle)
    rotate = jnp.stack(
        [jnp.stack([one, zero, zero], -1), jnp.stack([zero, cos, -sin], -1), jnp.stack([zero, sin, cos], -1)], 1
    )
    hue = jnp.asarray(np.linalg.inv(RGB_TO_YIQ)) @ rotate @ jnp.asarray(RGB_TO_YIQ)
    maps = then(hue, jnp.zeros((batch, 3)), maps)
    jitter = (u[:, 4] < 0.8)[:, None]
    matrix = jnp.where(jitter[..., None], maps[0], eye)
    offset = jnp.where(jitter, maps[1], 0.0)
    grey = (u[:, 5] < 0.2)[:, None]
    return jnp.where(grey[..., None], GREY @ matrix, matrix), jnp.where(grey, offset @ GREY.T, offset)


def colour_jitter(images: jnp.ndarray, draws: jnp.ndarray, strength: float) -> jnp.ndarray:
    """uint8 (B, H, W, 3) and the host's draws (B, 6) -> the jittered images as float32 pixel values in [0, 255]."""
    x = images.astype(jnp.float32)
    matrix, offset = colour_maps(draws, jnp.mean(x, axis=(1, 2)), strength)
    return jnp.clip(jnp.einsum("bhwc,bdc->bhwd", x, matrix) + offset[:, None, None, :], 0.0, 255.0)
