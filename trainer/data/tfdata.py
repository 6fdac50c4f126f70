"""The training input pipeline over TFRecord or webdataset shards (tf.data), resumable at the exact sample.

Per host and epoch: this host's files (every `count`-th of the sorted list) in a seeded order, read interleaved,
a seeded shuffle buffer of serialized records, then each record numbered (its ordinal in the host's epoch stream),
parsed, decoded, cropped in parallel and in order, batched, and each batch's captions tokenized in one call. The
position is (epoch, ordinals consumed): a resumed run rebuilds the same stream and skips the consumed records before
anything is decoded.

A bad sample (undecodable image, empty caption) fails its map call and is dropped there, but not silently: the
ordinals that do not come out are the bad ones, counted per host (the shard is looked up only for the error message,
by reading the record stream again without decoding it). A truncated shard ends early; with the shard set's index
(record counts) the missing records are counted at the end of the epoch. Past `data.max_bad_fraction` the run stops
with an error naming the shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np

from trainer.data import Batch, Host, Position, examples, preprocess
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import Tokenizer, from_recipe
from trainer.recipe import Recipe, RecipeError

MIN_SAMPLES_FOR_BAD_CHECK = 100  # a fraction of a handful of samples says nothing


class BadDataError(RuntimeError):
    """Too many bad samples: one line naming the shard."""


def list_files(patterns: str, key: str) -> list[str]:
    """Comma-separated paths or globs (local or gs://), sorted; an empty match is an error naming the key."""
    files: list[str] = []
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
        matched = tf.io.gfile.glob(pattern)
        if not matched:
            raise RecipeError(f'{key} = "{pattern}" matches no files')
        files += matched
    return sorted(set(files))


def batches(
    recipe: Recipe, stage_index: int, host: Host, position: Position | None
) -> Iterator[tuple[Batch, Position]]:
    stage = recipe.stages[stage_index]
    files = list_files(recipe.data.train, "data.train")
    mine = files[host.index :: host.count]
    if not mine:
        raise RecipeError(f"data.train has {len(files)} files for {host.count} hosts: every host needs at least one")
    tokenizer = from_recipe(recipe)
    index = examples.read_index(mine)
    expected = np.array([index.get(f, -1) for f in mine])  # records per shard; -1: not in an index
    size = stage.global_batch // host.count
    # seen / bad: records (and bad ones) of this host's stream up to the position, so a resumed run counts alike
    state = dict(position or {"epoch": 0, "consumed": 0, "seen": 0, "bad": 0})
    while True:
        epoch, start = int(state["epoch"]), int(state["consumed"])
        good_per_file = np.zeros(len(mine), np.int64)
        stream = epoch_stream(recipe, stage.resolution, tokenizer, mine, epoch, start, size)
        end = start  # ordinals [start, end) of this epoch have come out of the stream, good or bad
        for chunk in stream.as_numpy_iterator():
            ordinals = chunk["ordinal"]
            good_per_file += np.bincount(chunk["file"], minlength=len(mine))
            begin, end = end, int(ordinals[-1]) + 1
            state["seen"] += end - begin
            if len(ordinals) == size:
                state["consumed"] = end
            gap = partial(gap_shard, recipe, mine, epoch, begin, ordinals)
            tally(recipe, state, end - begin - len(ordinals), host, gap)
            if len(ordinals) < size:
                # the epoch's last rows, short of a batch: dropped with their epoch (counted as seen). No `break`:
                # the iterator is run to its end, since deleting one that has not ended stalled for 8-56 s here.
                continue
            yield {k: v for k, v in chunk.items() if k not in ("ordinal", "file")}, dict(state)
        if start == 0 and (expected >= 0).all():
            # the whole epoch was read: records the index promises that never came out (a truncated shard's, or bad
            # ones after the last good row) are bad too
            missing = int(expected.sum()) - end
            short = [f for f, n, good in zip(mine, expected, good_per_file, strict=True) if good < n] or mine
            state["seen"] += missing
            tally(recipe, state, missing, host, short[-1])
        state["epoch"] = epoch + 1
        state["consumed"] = 0


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
    """One shard's serialized examples; a damaged shard ends early (counted by the index, where there is one)."""
    if recipe.data.source == "webdataset":
        from trainer.data import webdataset

        args = (file, recipe.data.caption_key, recipe.data.recaption_key)
        spec = tf.TensorSpec((), tf.string)
        return tf.data.Dataset.from_generator(webdataset.records, args=args, output_signature=spec)
    return tf.data.TFRecordDataset(file).ignore_errors()


def record_stream(recipe: Recipe, files: list[str], epoch: int) -> tf.data.Dataset:
    """(ordinal, (file index, serialized example)) of every record of this host's epoch, in the epoch's order."""
    seed = recipe.data.seed
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    names = tf.data.Dataset.from_tensor_slices((order.astype(np.int32), [files[i] for i in order]))
    records = names.interleave(
        lambda i, f: shard_records(recipe, f).map(lambda r: (i, r)),
        cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    shuffled = records.shuffle(recipe.data.shuffle_buffer, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
    return shuffled.enumerate()


def epoch_stream(
    recipe: Recipe, resolution: int, tokenizer: Tokenizer, files: list[str], epoch: int, skip: int, size: int
) -> tf.data.Dataset:
    """The good rows of this host's epoch after the first `skip` records, in batches of `size` (the last may be
    short), each row with its ordinal and file index."""
    d, t = recipe.data, recipe.text
    caption_keys = (d.caption_key, d.recaption_key) if d.recaption_key else (d.caption_key,)

    def row(ordinal: tf.Tensor, pair: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        file, serialized = pair
        ex = examples.parse(serialized, caption_keys)
        alt = tf.strings.strip(ex[d.caption_key])
        target = tf.strings.strip(ex[d.recaption_key]) if d.recaption_key else alt
        target = tf.where(tf.strings.length(target) > 0, target, alt)  # no re-caption: the decoder learns the alt-text
        tf.debugging.assert_greater(tf.strings.length(alt), 0, "empty caption")
        sample_seed = tf.stack([tf.constant(d.seed, tf.int64) * 7919 + epoch, ordinal])
        image = preprocess.train_image(ex[examples.IMAGE], resolution, sample_seed, d.crop_min_area)
        row = {"images": image, "texts": alt, "captions": target, "ordinal": ordinal, "file": file}
        if d.color_jitter > 0:
            row["colour"] = preprocess.colour_draws(sample_seed)
        return row

    def tokenize(chunk: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        texts = tokenizer.batch(chunk["texts"], t.context_length)
        return {**chunk, "texts": texts, "captions": tokenizer.batch(chunk["captions"], t.caption_length)}

    records = record_stream(recipe, files, epoch).skip(skip)
    # a row whose decoding fails (bad image, empty caption) is dropped here; its ordinal's absence tells
    rows = records.map(row, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    return rows.batch(size).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
