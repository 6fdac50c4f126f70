"""Augmentation done on the device, inside the jitted step: colour jitter, OpenVision's exactly.

The host draws each sample's jitter (JITTER_DRAWS uniforms, `colour` in the batch, seeded per sample like its crop)
and the device applies it, so the input pipeline only decodes and crops. What it computes is OpenVision's
`simclr_jitter_gray(jitter_strength=0.4)` (src/transforms/ops_image.py, simclr_aug.py; SimCLR v2's), each random draw
replaced by the host's uniform:

  pixels / 255; with p 0.8 the four colour ops in a random order, each followed by a clip to [0, 1]:
    brightness  x * f,                  f ~ U[max(1 - 0.8 s, 0), 1 + 0.8 s]   (simclrv2: multiplicative)
    contrast    (x - mean_c) * f + mean_c, per channel over the image, f ~ U[1 - 0.8 s, 1 + 0.8 s]
    saturation  HSV: S := clip(S * f, 0, 1),                          f ~ U[1 - 0.8 s, 1 + 0.8 s]
    hue         HSV: H := (H + d) mod 1,                               d ~ U[-0.2 s, 0.2 s]
  then with p 0.2 grayscale (tf.image's weights 0.2989, 0.5870, 0.1140, on every channel);
  x 255, clip to [0, 255], truncate to whole numbers (OpenVision casts to uint8).

tf.image's random_contrast, random_saturation and random_hue draw their factor uniformly in those ranges, and
tf.random_shuffle the order; here the order is the argsort of four uniforms (every order equally likely).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale's
# a sample's draws: the four ops' factors, jitter?, grayscale?, then four uniforms whose argsort is the ops' order
BRIGHTNESS, CONTRAST, SATURATION, HUE, JITTER, GREY, ORDER = 0, 1, 2, 3, 4, 5, slice(6, 10)


def rgb_to_hsv(rgb: jnp.ndarray) -> jnp.ndarray:
    """(..., 3) in [0, 1] -> (..., 3) hue in [0, 1), saturation, value; tf.image's formulas."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    spread = value - jnp.min(rgb, axis=-1)
    saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(spread > 0, spread, 1.0)
    hue = jnp.where(r == value, (g - b) / safe, jnp.where(g == value, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    hue = jnp.where(spread > 0, hue, 0.0)
    return jnp.stack([jnp.where(hue < 0, hue + 1.0, hue), saturation, value], axis=-1)


def hsv_to_rgb(hsv: jnp.ndarray) -> jnp.ndarray:
    """The inverse of rgb_to_hsv: channel n is V - V S clip(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1."""
    hue, saturation, value = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + hue * 6.0, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def colour_jitter(images: jnp.ndarray, draws: jnp.ndarray, strength: float) -> jnp.ndarray:
    """uint8 (B, H, W, 3) and the host's draws (B, JITTER_DRAWS) -> the jittered images as float32 whole pixel values
    in [0, 255] (module docstring)."""
    x = images.astype(jnp.float32) / 255.0
    u = draws.astype(jnp.float32)
    per_image = lambda v: v[:, None, None, None]  # noqa: E731
    spread = 0.8 * strength
    low = max(1.0 - spread, 0.0)
    brightness = per_image(low + u[:, BRIGHTNESS] * (1.0 + spread - low))
    contrast = per_image(1.0 - spread + u[:, CONTRAST] * 2 * spread)
    saturation = 1.0 - spread + u[:, SATURATION] * 2 * spread
    hue = (2 * u[:, HUE] - 1) * 0.2 * strength

    def adjust_saturation(y: jnp.ndarray) -> jnp.ndarray:
        hsv = rgb_to_hsv(y)
        return hsv_to_rgb(hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * saturation[:, None, None], 0.0, 1.0)))

    def adjust_hue(y: jnp.ndarray) -> jnp.ndarray:
        hsv = rgb_to_hsv(y)
        return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + hue[:, None, None], 1.0)))

    def adjust_contrast(y: jnp.ndarray) -> jnp.ndarray:
        mean = y.mean(axis=(1, 2), keepdims=True)  # per image and channel, as tf.image.adjust_contrast
        return (y - mean) * contrast + mean

    ops = (lambda y: y * brightness, adjust_contrast, adjust_saturation, adjust_hue)
    order = jnp.argsort(u[:, ORDER], axis=1)  # (B, 4): the op each image applies at each position
    y = x
    for position in range(4):  # every op on every image, each image keeping its own (one elementwise fusion)
        which = per_image(order[:, position])
        outcome = jnp.clip(ops[0](y), 0.0, 1.0)
        for index, op in enumerate(ops[1:], start=1):
            outcome = jnp.where(which == index, jnp.clip(op(y), 0.0, 1.0), outcome)
        y = outcome
    y = jnp.where(per_image(u[:, JITTER] < 0.8), y, x)
    grey = jnp.broadcast_to(jnp.einsum("bhwc,c->bhw", y, GREY_WEIGHTS)[..., None], y.shape)
    y = jnp.where(per_image(u[:, GREY] < 0.2), grey, y)
    return jnp.floor(jnp.clip(y * 255.0, 0.0, 255.0))
