"""The training input pipeline over TFRecord or webdataset shards (tf.data), resumable at the exact sample.

Per host and epoch: this host's files (every `count`-th of the sorted list) in a seeded order, read interleaved,
a seeded shuffle buffer of serialized records, then each record numbered (its ordinal in the host's epoch stream).
The epochs follow each other in one dataset, so decoding never stops at an epoch's end; the records are parsed,
decoded, cropped in parallel and in order, batched (a batch may span two epochs), and each batch's captions tokenized
in one call. The position is (epoch, ordinals consumed): a resumed run rebuilds the same stream and skips the
consumed records before anything is decoded.

A bad sample (undecodable image, empty caption) fails its map call and is dropped there, but not silently: the
ordinals that do not come out are the bad ones, counted per host (the shard is looked up only for the error message,
by reading the record stream again without decoding it). A truncated shard ends early; with the shard set's index
(record counts) the missing records are counted at the end of the epoch. Past `data.max_bad_fraction` the run stops
with an error naming the shard; a host whose first shard starts with nothing usable stops before streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np

from trainer import storage
from trainer.data import Batch, Host, Position, examples, preprocess, wants_captions
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import Tokenizer, from_recipe
from trainer.recipe import Recipe, RecipeError

MIN_SAMPLES_FOR_BAD_CHECK = 100  # a fraction of a handful of samples says nothing


class BadDataError(RuntimeError):
    """Too many bad samples: one line naming the shard."""


def batches(
    recipe: Recipe, stage_index: int, host: Host, position: Position | None
) -> Iterator[tuple[Batch, Position]]:
    stage = recipe.stages[stage_index]
    files = storage.list_files(recipe.data.train, "data.train")
    mine = files[host.index :: host.count]
    if not mine:
        raise RecipeError(f"data.train has {len(files)} files for {host.count} hosts: every host needs at least one")
    tokenizer = from_recipe(recipe)
    index = examples.read_index(mine)
    expected = np.array([index.get(f, -1) for f in mine])  # records per shard; -1: not in an index
    size = stage.global_batch // host.count
    # seen / bad: records (and bad ones) of this host's stream up to the position, so a resumed run counts alike
    state = dict(position or {"epoch": 0, "consumed": 0, "seen": 0, "bad": 0})
    epoch, end = int(state["epoch"]), int(state["consumed"])  # ordinals [0, end) of `epoch` have come out
    whole = end == 0  # this epoch is read from its start (its per-shard counts are complete)
    good_per_file = np.zeros(len(mine), np.int64)
    preflight(recipe, stage.resolution, mine[0])
    stream = endless_stream(recipe, stage.resolution, tokenizer, mine, epoch, end, size)
    for chunk in stream.as_numpy_iterator():
        # a batch may span the end of one epoch and the start of the next: account for each part in turn
        for part in np.split(np.arange(size), np.flatnonzero(np.diff(chunk["epoch"])) + 1):
            while int(chunk["epoch"][part[0]]) > epoch:  # the stream has moved on: what `epoch` never gave is bad
                finish_epoch(recipe, state, host, mine, expected, good_per_file, end, whole)
                epoch, end, whole = epoch + 1, 0, True
                good_per_file[:] = 0
            ordinals = chunk["ordinal"][part]
            good_per_file += np.bincount(chunk["file"][part], minlength=len(mine))
            begin, end = end, int(ordinals[-1]) + 1
            state["seen"] += end - begin
            gap = partial(gap_shard, recipe, mine, epoch, begin, ordinals)
            tally(recipe, state, end - begin - len(ordinals), host, gap)
        state["epoch"], state["consumed"] = epoch, end
        yield {k: v for k, v in chunk.items() if k not in ("epoch", "ordinal", "file")}, dict(state)


def finish_epoch(
    recipe: Recipe,
    state: dict[str, Any],
    host: Host,
    files: list[str],
    expected: np.ndarray,
    good_per_file: np.ndarray,
    end: int,
    whole: bool,
) -> None:
    """At an epoch's end: records the index promises that never came out (a truncated shard's, or bad ones after
    the last good row) are bad too. Without an index for every shard nothing more can be known."""
    if not (expected >= 0).all():
        return
    missing = int(expected.sum()) - end
    state["seen"] += missing
    short = [f for f, n, good in zip(files, expected, good_per_file, strict=True) if good < n] if whole else []
    tally(recipe, state, missing, host, (short or files)[-1])


def tally(recipe: Recipe, state: dict[str, Any], bad: int, host: Host, shard: str | Callable[[], str]) -> None:
    """Counts `bad` more bad records; past the recipe's fraction, stops with the (latest) bad one's shard named."""
    if bad <= 0:
        return
    state["bad"] += bad
    total = state["seen"]
    if total >= MIN_SAMPLES_FOR_BAD_CHECK and state["bad"] / total > recipe.data.max_bad_fraction:
        raise BadDataError(
            f"data: {state['bad']} of {total} samples on host {host.index} were bad (undecodable image, empty"
            f" caption or truncated shard), more than data.max_bad_fraction = {recipe.data.max_bad_fraction};"
            f" the latest in {shard if isinstance(shard, str) else shard()}"
        )


def gap_shard(recipe: Recipe, files: list[str], epoch: int, begin: int, ordinals: np.ndarray) -> str:
    """The shard of the last record in [begin, ordinals[-1]] that did not come out (found by reading the epoch's
    record stream again, without decoding: only on the way to an error)."""
    last_missing = max(set(range(begin, int(ordinals[-1]) + 1)) - set(ordinals.tolist()))
    for _, (file, _) in record_stream(recipe, files, epoch).skip(last_missing).take(1).as_numpy_iterator():
        return files[int(file)]
    return files[-1]


def shard_records(recipe: Recipe, file: tf.Tensor) -> tf.data.Dataset:
    """One shard's records: serialized examples, or a tar's (image, alt-text, re-caption) bytes; a damaged shard ends
    early (counted by the index, where there is one)."""
    if recipe.data.source == "webdataset":
        from trainer.data import webdataset

        spec = (tf.TensorSpec([None], tf.string),) * 3
        args = (file, recaption_key(recipe))  # "": a tar's JSON is not even parsed
        chunks = tf.data.Dataset.from_generator(webdataset.chunks, args=args, output_signature=spec)
        return chunks.unbatch()
    return tf.data.TFRecordDataset(file).ignore_errors()


def record_fields(recipe: Recipe, record: tf.Tensor | tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(image bytes, alt-text, re-caption: "" when missing or when no caption decoder reads it) of a record of either
    source."""
    d = recipe.data
    if isinstance(record, tuple):
        return record
    recaption = recaption_key(recipe)
    ex = examples.parse(record, (d.caption_key, recaption) if recaption else (d.caption_key,))
    return ex[examples.IMAGE], ex[d.caption_key], ex[recaption] if recaption else tf.constant("")


def recaption_key(recipe: Recipe) -> str:
    """The re-caption field to read from a record: "" (none) without a caption decoder."""
    return recipe.data.recaption_key if wants_captions(recipe) else ""


def record_stream(recipe: Recipe, files: list[str], epoch: int | tf.Tensor) -> tf.data.Dataset:
    """(ordinal, (file index, record)) of every record of this host's epoch, in the epoch's order (a record as
    shard_records gives it)."""
    seed = recipe.data.seed
    epoch = tf.cast(epoch, tf.int64)
    order = tf.argsort(tf.random.stateless_uniform([len(files)], tf.stack([tf.constant(seed, tf.int64), epoch])))
    names = tf.data.Dataset.from_tensor_slices((order, tf.gather(tf.constant(files), order)))
    records = names.interleave(
        lambda i, f: shard_records(recipe, f).map(lambda *r: (i, r if len(r) > 1 else r[0])),
        cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    shuffled = records.shuffle(recipe.data.shuffle_buffer, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
    return shuffled.enumerate()


def sample_row(
    recipe: Recipe, resolution: int, epoch: tf.Tensor, ordinal: tf.Tensor, pair: tuple[tf.Tensor, tf.Tensor]
) -> dict[str, tf.Tensor]:
    """One record -> the training row (image crop, the captions untokenized, colour draws); raises on a bad one."""
    d = recipe.data
    file, record = pair
    image_bytes, alt, target = record_fields(recipe, record)
    alt = tf.strings.strip(alt)
    tf.debugging.assert_greater(tf.strings.length(alt), 0, "empty caption")
    sample_seed = tf.stack([tf.constant(d.seed, tf.int64) * 7919 + epoch, ordinal])
    image = preprocess.train_image(image_bytes, resolution, sample_seed, d.crop_min_area)
    row = {"images": image, "texts": alt, "epoch": epoch, "ordinal": ordinal, "file": file}
    if wants_captions(recipe):
        target = tf.strings.strip(target)
        row["captions"] = tf.where(tf.strings.length(target) > 0, target, alt)  # none: the decoder learns the alt-text
    if d.color_jitter > 0:
        row["colour"] = preprocess.colour_draws(sample_seed)
    return row


def preflight(recipe: Recipe, resolution: int, shard: str, probe: int = 32) -> None:
    """Reads the first records of the host's first shard: if none of them is usable (a wrong data.caption_key or
    data.source, an empty shard), one clear error now, instead of a stream that never yields a batch."""
    reason = "it holds no records"
    for record in shard_records(recipe, tf.constant(shard)).take(probe):
        try:
            sample_row(recipe, resolution, tf.constant(0, tf.int64), tf.constant(0, tf.int64), (0, record))
            return
        except tf.errors.InvalidArgumentError as error:
            if "empty caption" not in error.message:
                reason = f"the image does not decode ({str(error.message).splitlines()[0]})"
            elif isinstance(record, tuple):
                reason = "the samples' .txt members (the alt-text) are empty or missing"
            else:
                keys = sorted(tf.train.Example.FromString(record.numpy()).features.feature)
                reason = f'the caption under data.caption_key = "{recipe.data.caption_key}" is empty (keys: {keys})'
    raise BadDataError(f"data: no usable sample among the first {probe} of {shard}: {reason}")


def endless_stream(
    recipe: Recipe, resolution: int, tokenizer: Tokenizer, files: list[str], epoch: int, skip: int, size: int
) -> tf.data.Dataset:
    """The good rows of this host's epochs from `epoch` on, after that epoch's first `skip` records, in batches of
    `size`, each row with its epoch, ordinal and file index. One dataset for all epochs: the decoding keeps going
    across an epoch's end (a pipeline per epoch drained and refilled there; on small datasets that was a third of
    the time), and a batch may hold the end of one epoch and the start of the next."""
    t = recipe.text
    row = partial(sample_row, recipe, resolution)

    def epoch_records(e: tf.Tensor) -> tf.data.Dataset:
        records = record_stream(recipe, files, e).skip(tf.where(e == epoch, tf.constant(skip, tf.int64), 0))
        return records.map(lambda ordinal, pair: (e, ordinal, pair))

    def tokenize(chunk: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        tokens = {"texts": tokenizer.batch(chunk["texts"], t.context_length)}
        if "captions" in chunk:
            tokens["captions"] = tokenizer.batch(chunk["captions"], t.caption_length)
        return {**chunk, **tokens}

    records = tf.data.Dataset.range(epoch, 2**62).flat_map(epoch_records)
    # a row whose decoding fails (bad image, empty caption) is dropped here; its ordinal's absence tells
    rows = records.map(row, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    batched = rows.batch(size, drop_remainder=True)
    return batched.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
