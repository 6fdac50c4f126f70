"""Zero-shot classification: each class's text embedding is the normalised mean over the prompt templates (as CLIP);
an image's prediction is the class nearest its embedding. Reports top-1 and top-5 accuracy over the whole eval set.

The eval set: TFRecord shards with `image` and int64 `label` (python -m trainer.data.prepare writes them), or
webdataset tars as CLIP_benchmark publishes them (`KEY.jpg|png|webp` + `KEY.cls`, the class index): for tars, the
class names and templates default to `classnames.txt` and `zeroshot_classification_templates.txt` in the tars' folder
or the one above it, where they are (else ImageNet's and CLIP's). Templates mark the class name with `{}` or `{c}`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainer import sharding, storage
from trainer.data import Host
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import Tokenizer
from trainer.models.clip import Clip
from trainer.recipe import Eval, Recipe, RecipeError

SHIPPED = Path(__file__).parent / "data"
TAR_CLASSNAMES, TAR_TEMPLATES = "classnames.txt", "zeroshot_classification_templates.txt"  # CLIP_benchmark's names


def read_lines(path: str, default: str, key: str) -> list[str]:
    """The non-empty lines of a file (local or gs://), or of the shipped `default` when `path` is ""."""
    if not path:
        text = (SHIPPED / default).read_text()
    else:
        try:
            text = storage.read_text(path, key)
        except storage.StorageError as error:
            raise RecipeError(str(error)) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise RecipeError(f'{key} = "{path}" is empty')
    return lines


@cache
def encoders(model: Clip) -> tuple[Callable[..., jnp.ndarray], Callable[..., jnp.ndarray]]:
    """Jitted (text, image) encoders of a model, made once: evals every N steps reuse the compiled programs."""
    return jax.jit(partial(model.apply, method=Clip.encode_text)), jax.jit(
        partial(model.apply, method=Clip.encode_image)
    )


@cache
def scorer(model: Clip) -> Callable[..., jnp.ndarray]:
    return jax.jit(partial(_score, model))


def in_chunks(fn: Any, rows: np.ndarray, mesh: jax.sharding.Mesh, chunk: int = 1024) -> jnp.ndarray:
    """fn over `rows` (the same on every host) in device-divisible chunks, the whole result on every host; the
    padding rows are cut off again. Fewer rows than a chunk make one chunk of their own size (a few prompts padded to
    1,024 cost a 1,024-row pass: 2.5 TFLOP for So400m's text tower)."""
    devices = mesh.devices.size
    chunk = -(-max(1, min(chunk, len(rows))) // devices) * devices
    out = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
        result = fn(jax.device_put(padded, sharding.batch_sharding(mesh)))
        if not result.is_fully_addressable:  # on a pod each host holds its rows only: gather them all (a collective)
            from jax.experimental import multihost_utils

            result = multihost_utils.process_allgather(result, tiled=True)
        out.append(np.asarray(jax.device_get(result))[: len(part)])
    return jnp.asarray(np.concatenate(out))


def is_tar(files: list[str], key: str) -> bool:
    """Whether the eval files are webdataset tars (all of them) or TFRecord shards (none of them)."""
    tars = [f.endswith(".tar") for f in files]
    if any(tars) and not all(tars):
        raise RecipeError(f"{key} mixes .tar files with others: name webdataset tars or TFRecord shards")
    return all(tars)


def beside(files: list[str], name: str) -> str:
    """`name` in the folder of the first file, or in the folder above it ("" when in neither)."""
    folder = storage.at(files[0]).parent
    found = [p for p in (folder / name, folder.parent / name) if p.is_file()]
    return str(found[0]) if found else ""


def prompt(template: str, classname: str) -> str:
    if "{c}" in template:  # CLIP_benchmark's templates
        return template.replace("{c}", classname)
    return template.format(classname) if "{}" in template else f"{template} {classname}"


def labelled_images(
    files: list[str],
    resolution: int,
    batch: int,
    method: str = "bilinear",
    count: int | None = None,
    antialias: str = "beyond_2x",
) -> tuple[tf.data.Dataset, int]:
    """(batches of (image, label), the number of samples) of TFRecord shards or, when they end in .tar, webdataset
    tars with .cls labels; `count` when already known."""
    from trainer.data import examples, preprocess, webdataset

    def image(encoded: tf.Tensor) -> tf.Tensor:
        return preprocess.eval_image(preprocess.decode_accurately(encoded), resolution, method, antialias)

    def row(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        ex = examples.parse(serialized, (), with_label=True)
        return image(ex[examples.IMAGE]), ex[examples.LABEL]

    if files and all(f.endswith(".tar") for f in files):
        spec = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64))
        samples = tf.data.Dataset.from_tensor_slices(files).flat_map(
            lambda f: tf.data.Dataset.from_generator(webdataset.labelled, args=(f,), output_signature=spec)
        )
        if count is None:
            count = sum(webdataset.count_labelled(f) for f in files)
        pairs = samples.map(lambda encoded, label: (image(encoded), label), num_parallel_calls=tf.data.AUTOTUNE)
        return pairs.batch(batch).prefetch(tf.data.AUTOTUNE), count
    records = tf.data.TFRecordDataset(files)
    known = examples.read_index(files)  # the shards' index spares a counting pass over the whole set
    if count is None and all(f in known for f in files):
        count = sum(known[f] for f in files)
    elif count is None:
        count = int(records.reduce(0, lambda n, _: n + 1).numpy())
    data = records.map(row, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)
    return data, count


class ZeroShot:
    """The class names x templates tokenized and the eval file list, read once; `run` embeds the classes with the
    current params and scores the eval set."""

    def __init__(self, recipe: Recipe, spec: Eval, key: str, tokenizer: Tokenizer):
        self.name, self.spec, self.key, self.eval_resize = spec.name, spec, key, recipe.data.eval_resize
        self.antialias = recipe.data.antialias
        self.files = storage.list_files(spec.path, f"{key}.path")
        tars = is_tar(self.files, f"{key}.path")
        names_file = spec.classnames or (beside(self.files, TAR_CLASSNAMES) if tars else "")
        templates_file = spec.templates or (beside(self.files, TAR_TEMPLATES) if tars else "")
        classnames = read_lines(names_file, "imagenet_classnames.txt", f"{key}.classnames")
        templates = read_lines(templates_file, "clip_templates.txt", f"{key}.templates")
        self.classes, self.templates = len(classnames), len(templates)
        prompts = [prompt(t, c) for c in classnames for t in templates]
        self.prompt_ids = tokenizer.batch(tf.constant(prompts), recipe.text.context_length).numpy()
        self.counts: dict[tuple[str, ...], int] = {}  # samples per file list (a tar set's count reads its headers)

    def class_embeddings(self, model: Clip, params: Any, mesh: jax.sharding.Mesh) -> jnp.ndarray:
        encode_text, _ = encoders(model)
        text_emb = in_chunks(lambda x: encode_text({"params": params}, x), self.prompt_ids, mesh)
        per_class = text_emb.reshape(self.classes, self.templates, -1).mean(axis=1)
        return per_class / jnp.linalg.norm(per_class, axis=-1, keepdims=True)

    def run(self, model: Clip, params: Any, mesh: jax.sharding.Mesh, resolution: int) -> dict[str, float]:
        host = Host(jax.process_index(), jax.process_count())
        batch = self.spec.batch
        if batch % mesh.devices.size:
            raise RecipeError(f"{self.key}.batch = {batch} is not divisible by {mesh.devices.size} devices")
        classes = self.class_embeddings(model, params, mesh)
        local = batch // host.count
        # this host's reads may fail (a bucket hiccup, a damaged image) while the others' do not: it then feeds
        # padding, so every host runs the same collectives, and all of them report the failure at the end
        failure: Exception | None = None
        try:
            mine = tuple(self.files[host.index :: host.count])
            counted = self.counts.get(mine)
            images, count = labelled_images(list(mine), resolution, local, self.eval_resize, counted, self.antialias)
            self.counts[mine] = count
            stream = images.as_numpy_iterator()
        except Exception as error:
            failure, stream, count = error, iter(()), 0
        steps = -(-count // local)
        if host.count > 1:  # every host runs the same number of (padded) batches
            from jax.experimental import multihost_utils

            steps = int(np.max(multihost_utils.process_allgather(np.array([steps]))))
        score = scorer(model)
        batch_sharding = sharding.batch_sharding(mesh)
        totals = np.zeros(3)
        empty = (np.zeros((0, resolution, resolution, 3), np.uint8), np.zeros((0,), np.int64))
        for _ in range(steps):
            pixels, labels = empty
            if failure is None:
                try:
                    pixels, labels = next(stream, empty)
                except Exception as error:
                    failure = error
            pad = local - len(labels)
            rows = {
                "images": np.concatenate([pixels, np.zeros((pad, resolution, resolution, 3), np.uint8)]),
                "labels": np.concatenate([labels, np.full((pad,), -1)]).astype(np.int32),
            }
            arrays = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in rows.items()}
            totals += np.asarray(jax.device_get(score(params, classes, arrays["images"], arrays["labels"])))
        raise_if_any_host_failed(failure, host)
        top1, top5, seen = totals
        return {"top1": top1 / max(seen, 1), "top5": top5 / max(seen, 1), "samples": seen}


class FailedElsewhere(RuntimeError):
    """An eval this host ran to its end failed on another host: its result is not whole."""


def raise_if_any_host_failed(failure: Exception | None, host: Host) -> None:
    """Every host raises when any of them failed (a collective: all hosts call it together), so all of them report
    the eval failed and go back to training in step."""
    failed = [failure is not None]
    if host.count > 1:
        from jax.experimental import multihost_utils

        failed = [bool(f) for f in np.asarray(multihost_utils.process_allgather(np.array([failure is not None])))]
    if failure is not None:
        raise failure
    if any(failed):
        raise FailedElsewhere(f"it failed on host {failed.index(True)} (that host's log says why)")


def _score(model: Clip, params: Any, classes: jnp.ndarray, images: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    return hits(encoders(model)[1]({"params": params}, images), classes, labels)


def hits(image_emb: jnp.ndarray, classes: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """(top-1 hits, top-5 hits, samples) of a batch: the nearest classes by cosine; label -1 marks padding."""
    logits = image_emb @ classes.T
    top = jax.lax.top_k(logits, min(5, classes.shape[0]))[1]
    valid = labels >= 0
    hit1 = (top[:, 0] == labels) & valid
    hit5 = jnp.any(top == labels[:, None], axis=1) & valid
    return jnp.stack([hit1.sum(), hit5.sum(), valid.sum()]).astype(jnp.float32)
