"""Image preprocessing in the tf.data graph: uint8 in, uint8 out (the model scales to [-1, 1] on the device).

Training: random-resized crop (area [crop_min_area, 1], aspect 3/4-4/3, as OpenVision), no flip; the
sample's colour-jitter draws (the device applies them: trainer/augment.py).
Evaluation: resize the shorter side, centre crop. Randomness is stateless, seeded per sample: the same sample gets the
same crop on a resumed run.

Both resize alike (`resize`): bilinear, antialiased only where the image shrinks by more than 2x. A model sees at
evaluation the interpolation it was trained on: on the demo, evaluating with an antialiased resize that training
never used cost 0.37 points of zero-shot top-1 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable

from trainer.data import JITTER_DRAWS
from trainer.data.tfsetup import tf


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """JPEG, PNG, WebP, GIF (first frame) or BMP -> (H, W, 3) uint8; raises on anything undecodable."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def crop_window(shape: tf.Tensor, seed: tf.Tensor, min_area: float) -> tuple[tf.Tensor, tf.Tensor]:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        area_range=(min_area, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def train_image(image_bytes: tf.Tensor, resolution: int, seed: tf.Tensor, min_area: float) -> tf.Tensor:
    """Encoded image -> the training crop. A JPEG decodes only its crop window, with the fast integer IDCT (as
    TF-slim's Inception training input: its error is below what the crop's resize and the jitter change), and at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the window stays at least `resolution` on its shorter side:
    the low-resolution stages then skip most of the inverse DCT and resize from a smaller image."""

    def jpeg() -> tf.Tensor:
        begin, size = crop_window(tf.image.extract_jpeg_shape(image_bytes), seed, min_area)
        fits = tf.reduce_min(size[:2]) // resolution  # how many times over the window covers the output
        scale = tf.reduce_sum(tf.cast(fits >= tf.constant([2, 4, 8]), tf.int32))  # 0..3: 1/1, 1/2, 1/4, 1/8

        def scaled(ratio: int) -> Callable[[], tf.Tensor]:
            window = tf.stack([begin[0], begin[1], size[0], size[1]]) // ratio  # in the scaled image's pixels
            return lambda: tf.image.decode_and_crop_jpeg(
                image_bytes, window, channels=3, ratio=ratio, dct_method="INTEGER_FAST"
            )

        window = tf.switch_case(scale, [scaled(r) for r in (1, 2, 4, 8)])
        return tf.image.resize(window, (resolution, resolution), method="bilinear")

    def other() -> tf.Tensor:
        image = decode(image_bytes)
        begin, size = crop_window(tf.shape(image), seed, min_area)
        return resize(tf.slice(image, begin, size), (resolution, resolution))

    # a JPEG window is within 2x of the output on its shorter side once scaled in the DCT: plain bilinear, no test
    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([resolution, resolution, 3])
    return to_uint8(image)


def resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    """Bilinear to `size` (float32 out); antialiased (a tent filter as wide as the shrink) only where the image
    shrinks by more than 2x, where plain bilinear would skip pixels."""
    shrink = tf.reduce_max(tf.cast(tf.shape(image)[:2], tf.float32) / tf.cast(size, tf.float32))
    return tf.cond(
        shrink > 2.0,
        lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
        lambda: tf.image.resize(image, size, method="bilinear"),
    )


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Rounded; a bilinear or tent filter stays within its input's [0, 255], so there is nothing to clip."""
    return tf.cast(image + 0.5, tf.uint8)


def colour_draws(seed: tf.Tensor) -> tf.Tensor:
    """The sample's colour-jitter randomness (trainer.augment applies it on the device)."""
    return tf.random.stateless_uniform([JITTER_DRAWS], tf.random.experimental.stateless_split(seed, 1)[0])


def eval_image(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """Shorter side to `resolution`, then the centre square."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resolution / tf.reduce_min(shape)
    size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize_with_crop_or_pad(resize(image, size), resolution, resolution)
    return to_uint8(image)
