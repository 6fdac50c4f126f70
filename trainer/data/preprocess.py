"""Image preprocessing in the tf.data graph: uint8 in, uint8 out (the model scales to [-1, 1] on the device).

Training: random-resized crop (area [crop_min_area, 1], aspect 3/4-4/3, as OpenVision), no flip; the
sample's colour-jitter draws (the device applies them: trainer/augment.py).
Evaluation: resize the shorter side, centre crop. Randomness is stateless, seeded per sample: the same sample gets the
same crop on a resumed run.

Both resize alike (`resize`): bilinear, antialiased only where the image shrinks by more than 2x, or (data.antialias
= "always", OpenVision's) always. A model sees at evaluation the interpolation it was trained on: on the demo,
evaluating with an antialiased resize that training never used cost 0.37 points of zero-shot top-1
(benchmarks/RESULTS.md). data.scaled_decode = false decodes every image whole (OpenVision's input) before cropping.
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


def decode_accurately(image_bytes: tf.Tensor) -> tf.Tensor:
    """As `decode`, but a JPEG with libjpeg's accurate integer IDCT, not TF's default fast one: evaluation's decode,
    the same pixels as PIL's (and so open_clip's), where the fast IDCT is off by up to 18 levels."""
    accurate = lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE")  # noqa: E731
    image = tf.cond(tf.io.is_jpeg(image_bytes), accurate, lambda: decode(image_bytes))
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


def train_image(
    image_bytes: tf.Tensor,
    resolution: int,
    seed: tf.Tensor,
    min_area: float,
    antialias: str = "beyond_2x",
    scaled_decode: bool = True,
) -> tf.Tensor:
    """Encoded image -> the training crop. With `scaled_decode`, a JPEG decodes only its crop window, with the fast
    integer IDCT (as TF-slim's Inception training input: its error is below what the crop's resize and the jitter
    change), and at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the window stays at least `resolution` on its
    shorter side: the low-resolution stages then skip most of the inverse DCT and resize from a smaller image.
    Without it, every image is decoded whole, then cropped (OpenVision's inception_crop)."""

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
        # the window is within 2x of the output on its shorter side once scaled in the DCT: plain bilinear there
        return tf.image.resize(window, (resolution, resolution), method="bilinear", antialias=antialias == "always")

    def other() -> tf.Tensor:
        image = decode(image_bytes)
        begin, size = crop_window(tf.shape(image), seed, min_area)
        return resize(tf.slice(image, begin, size), (resolution, resolution), antialias)

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other) if scaled_decode else other()
    image.set_shape([resolution, resolution, 3])
    return to_uint8(image)


def resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor, antialias: str = "beyond_2x") -> tf.Tensor:
    """Bilinear to `size` (float32 out); antialiased (a tent filter as wide as the shrink) "always", or only where
    the image shrinks by more than 2x ("beyond_2x"), where plain bilinear would skip pixels."""
    if antialias == "always":
        return tf.image.resize(image, size, method="bilinear", antialias=True)
    shrink = tf.reduce_max(tf.cast(tf.shape(image)[:2], tf.float32) / tf.cast(size, tf.float32))
    return tf.cond(
        shrink > 2.0,
        lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
        lambda: tf.image.resize(image, size, method="bilinear"),
    )


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Rounded; a bilinear or tent filter stays within its input's [0, 255], so there is nothing to clip."""
    return tf.cast(image + 0.5, tf.uint8)


def random_sentence(text: tf.Tensor, fallback: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One sentence of `text`, drawn with the sample's seed: OpenVision's second text for the contrastive loss (its
    bert_ops.my_bert_tokenize): cut at every run of "." and "!", empty pieces dropped; `fallback` if none is left."""
    pieces = tf.strings.split(tf.strings.regex_replace(text, r"[\.\!]+", "|"), sep="|")
    pieces = tf.boolean_mask(pieces, tf.strings.length(pieces) > 0)
    count = tf.size(pieces)
    draw_seed = tf.random.experimental.stateless_split(seed, 2)[1]  # not the colour draws' stream
    index = tf.cast(tf.random.stateless_uniform([], draw_seed) * tf.cast(count, tf.float32), tf.int32)
    index = tf.minimum(index, tf.maximum(count - 1, 0))
    return tf.cond(count > 0, lambda: tf.gather(pieces, index), lambda: fallback)


def colour_draws(seed: tf.Tensor) -> tf.Tensor:
    """The sample's colour-jitter randomness (trainer.augment applies it on the device)."""
    return tf.random.stateless_uniform([JITTER_DRAWS], tf.random.experimental.stateless_split(seed, 1)[0])


def eval_image(image: tf.Tensor, resolution: int, method: str = "bilinear", antialias: str = "beyond_2x") -> tf.Tensor:
    """Shorter side to `resolution`, then the centre square; `method` "pil_bicubic" is open_clip's eval transform."""
    if method == "pil_bicubic":
        return open_clip_eval_image(image, resolution)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resolution / tf.reduce_min(shape)
    size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize_with_crop_or_pad(resize(image, size, antialias), resolution, resolution)
    return to_uint8(image)


# PIL's resampling arithmetic, which open_clip's eval transform (torchvision's Resize on a PIL image) runs: each axis
# a separate pass, weights quantised to 22 fractional bits, every pass rounded and clipped to uint8.
PIL_PRECISION_BITS = 22


def pil_bicubic_weights(in_size: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
    """(out_size, in_size) float64 matrix of PIL's integer bicubic weights (a = -0.5; widened by the shrink, so it
    antialiases), for one axis, as Pillow's precompute_coeffs and normalize_coeffs_8bpc make them."""
    in_f, out_f = tf.cast(in_size, tf.float64), tf.cast(out_size, tf.float64)
    scale = in_f / out_f
    filter_scale = tf.maximum(scale, 1.0)
    support = 2.0 * filter_scale
    center = (tf.range(out_f, dtype=tf.float64) + 0.5) * scale
    xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)  # C's (int) cast; negative values are clamped anyway
    xmax = tf.minimum(tf.floor(center + support + 0.5), in_f)
    x = tf.range(in_f, dtype=tf.float64)[None, :]
    t = tf.abs((x - center[:, None] + 0.5) * (1.0 / filter_scale))  # as Pillow: times the reciprocal
    a = -0.5
    w = tf.where(
        t < 1.0,
        ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
        tf.where(t < 2.0, (((t - 5.0) * t + 8.0) * t - 4.0) * a, 0.0),
    )
    w = tf.where((x >= xmin[:, None]) & (x < xmax[:, None]), w, 0.0)
    total = tf.reduce_sum(w, axis=1, keepdims=True)
    w = tf.math.divide_no_nan(w, total) * float(1 << PIL_PRECISION_BITS)
    return tf.where(w < 0, tf.math.ceil(w - 0.5), tf.floor(w + 0.5))  # C's (int)(w -/+ 0.5): truncation


def pil_resize_pass(image: tf.Tensor, weights: tf.Tensor, axis: int) -> tf.Tensor:
    """One axis of PIL's resize of uint8 `image` (H, W, 3): exact integer sums (in float64: below 2^53), rounded."""
    pixels = tf.cast(image, tf.float64)
    summed = tf.einsum("hwc,ow->hoc", pixels, weights) if axis == 1 else tf.einsum("hwc,oh->owc", pixels, weights)
    rounded = tf.floor((summed + float(1 << (PIL_PRECISION_BITS - 1))) / float(1 << PIL_PRECISION_BITS))
    return tf.cast(tf.clip_by_value(rounded, 0.0, 255.0), tf.uint8)


def open_clip_eval_image(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """torchvision's Resize(resolution, BICUBIC) on a PIL image, then CenterCrop(resolution): the shorter side to
    `resolution`, the longer to int(resolution * long / short), PIL's bicubic (horizontal pass first), then the crop
    offset round((size - resolution) / 2), rounding halves to even as Python does."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.floor(resolution * tf.cast(long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
    new_h = tf.where(h <= w, resolution, new_long)
    new_w = tf.where(h <= w, new_long, resolution)
    image = pil_resize_pass(image, pil_bicubic_weights(w, new_w), axis=1)
    image = pil_resize_pass(image, pil_bicubic_weights(h, new_h), axis=0)
    top = tf.cast(tf.round(tf.cast(new_h - resolution, tf.float64) / 2.0), tf.int32)  # tf.round: halves to even
    left = tf.cast(tf.round(tf.cast(new_w - resolution, tf.float64) / 2.0), tf.int32)
    image = image[top : top + resolution, left : left + resolution]
    image.set_shape([resolution, resolution, 3])
    return image
