"""The training input pipeline over TFRecord, TFDS or webdataset shards (tf.data), resumable at the exact sample.

Per source, host and epoch: this host's files (every `count`-th of the source's sorted list) in a seeded order, read
interleaved, a seeded shuffle buffer of serialized records, then each record numbered (its ordinal in the host's
epoch stream). The epochs follow each other in one dataset, so decoding never stops at an epoch's end; the records
are parsed, decoded, cropped in parallel and in order, batched (a batch may span two epochs), and each batch's
captions tokenized in one call. A source's position is (epoch, ordinals consumed): a resumed run rebuilds the same
stream from the window of shards that holds its next record (record_stream), reading no earlier window, and skips
that window's consumed records before anything is decoded.

A mixture (`[[data.mixture]]`) decodes each source's rows as above and picks every row's source by a draw: draw i
is a categorical sample of the weights seeded by (data.seed, i), so the position is the draws made plus each
source's own position, and a resumed run makes the same draws from the same rows (tf.data's choose_from_datasets;
sample_from_datasets draws the same way from a stateful generator, which cannot be restarted mid-stream).

A bad sample (undecodable image, empty caption) fails its map call and is dropped there, but not silently: the
ordinals that do not come out are the bad ones, counted per host and source (the shard is looked up only for the
error message, by reading the record stream again without decoding it). A truncated shard ends early; with the
shard set's index (record counts; a TFDS split's shard lengths) the missing records are counted at the end of the
epoch. Past `data.max_bad_fraction` the run stops with an error naming the shard; a host whose first shard starts
with nothing usable stops before streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from trainer.data import Batch, Host, Position, examples, preprocess, reads_recaptions, sources, wants_captions
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import Tokenizer, from_recipe
from trainer.recipe import Recipe, RecipeError, Source

MIN_SAMPLES_FOR_BAD_CHECK = 100  # a fraction of a handful of samples says nothing
SOURCE_SEED_STRIDE = 1_000_003  # source k's seeds are data.seed + k * this: its order and crops differ from the others'
BOOKKEEPING = ("epoch", "ordinal", "file", "source")  # a row's columns that only the position needs


class BadDataError(RuntimeError):
    """Too many bad samples: one line naming the shard."""


@dataclass(frozen=True)
class Part:
    """One training source as this host reads it."""

    index: int  # in data.sources()
    spec: Source
    files: list[str]  # this host's shards
    expected: np.ndarray  # records per shard; -1: unknown (no index)
    seed: int


def open_parts(recipe: Recipe, host: Host) -> list[Part]:
    parts = []
    for k, spec in enumerate(recipe.data.sources()):
        files, index = sources.shards(spec)
        mine = files[host.index :: host.count]
        if not mine:
            raise RecipeError(
                f"{spec.key('train')} has {len(files)} files for {host.count} hosts: every host needs at least one"
            )
        expected = np.array([index.get(f, -1) for f in mine])
        parts.append(Part(k, spec, mine, expected, recipe.data.seed + k * SOURCE_SEED_STRIDE))
    return parts


def batches(
    recipe: Recipe, stage_index: int, host: Host, position: Position | None
) -> Iterator[tuple[Batch, Position]]:
    stage = recipe.stages[stage_index]
    parts = open_parts(recipe, host)
    tokenizer = from_recipe(recipe)
    size = stage.global_batch // host.count
    mixed = bool(recipe.data.mixture)
    saved: dict[str, Any] = dict(position or {})
    if position and mixed != ("sources" in saved):
        raise RecipeError(
            "the checkpoint's data position is of "
            + ("one source, the recipe has a data.mixture" if mixed else "a data.mixture, the recipe has one source")
            + ": the stream cannot resume (start a new workdir)"
        )
    states = saved.get("sources", [None] * len(parts)) if mixed else [position]
    if len(states) != len(parts):
        raise RecipeError(
            f"the checkpoint's data position is of {len(states)} sources, the recipe's data.mixture has {len(parts)}:"
            " a changed mixture cannot resume its stream (start a new workdir)"
        )
    trackers = [Tracker(recipe, part, host, state) for part, state in zip(parts, states, strict=True)]
    draws = int(saved.get("draws", 0))
    for part in parts:
        preflight(recipe, part, stage.resolution)
    starts = [(t.epoch, t.end) for t in trackers]
    stream = endless_stream(recipe, stage.resolution, tokenizer, parts, starts, draws if mixed else None, size)
    return _positioned(stream.as_numpy_iterator(), trackers, size, draws, mixed)


def _positioned(
    chunks: Iterator[dict[str, np.ndarray]], trackers: list[Tracker], size: int, draws: int, mixed: bool
) -> Iterator[tuple[Batch, Position]]:
    """Each batch with the stream's position right after it. Only this iterates on the prefetch thread: `batches`
    opens everything before it on the caller's, because TensorFlow Datasets' imports swap Python's import function
    for the whole process (etils' lazy_imports) and a JAX import made meanwhile on another thread fails."""
    for chunk in chunks:
        for k, tracker in enumerate(trackers):
            rows = np.flatnonzero(chunk["source"] == k)
            if len(rows):
                tracker.take(chunk["epoch"][rows], chunk["ordinal"][rows], chunk["file"][rows])
        draws += size
        batch = {k: v for k, v in chunk.items() if k not in BOOKKEEPING}
        if not mixed:
            yield batch, dict(trackers[0].state)
            continue
        each = [dict(t.state) for t in trackers]
        yield batch, {"draws": draws, "sources": each, "bad": sum(s["bad"] for s in each)}


class Tracker:
    """One source's position and bad-sample count on this host, advanced by the rows of each batch it gave."""

    def __init__(self, recipe: Recipe, part: Part, host: Host, position: Position | None):
        self.recipe, self.part, self.host = recipe, part, host
        # seen / bad: records (and bad ones) of this host's stream up to the position, so a resumed run counts alike
        self.state: dict[str, Any] = dict(position or {"epoch": 0, "consumed": 0, "seen": 0, "bad": 0})
        self.epoch, self.end = int(self.state["epoch"]), int(self.state["consumed"])  # [0, end) of epoch came out
        self.whole = self.end == 0  # this epoch is read from its start (its per-shard counts are complete)
        self.good_per_file = np.zeros(len(part.files), np.int64)

    def take(self, epochs: np.ndarray, ordinals: np.ndarray, files: np.ndarray) -> None:
        """This source's rows of a batch, in order: a batch may span the end of one epoch and the start of the
        next, so each part is accounted for in turn."""
        for part in np.split(np.arange(len(ordinals)), np.flatnonzero(np.diff(epochs)) + 1):
            while int(epochs[part[0]]) > self.epoch:  # the stream has moved on: what `epoch` never gave is bad
                self.finish_epoch()
                self.epoch, self.end, self.whole = self.epoch + 1, 0, True
                self.good_per_file[:] = 0
            taken = ordinals[part]
            self.good_per_file += np.bincount(files[part], minlength=len(self.part.files))
            begin, self.end = self.end, int(taken[-1]) + 1
            self.state["seen"] += self.end - begin
            gap = partial(gap_shard, self.recipe, self.part, self.epoch, begin, taken)
            self.tally(self.end - begin - len(taken), gap)
        self.state["epoch"], self.state["consumed"] = self.epoch, self.end

    def finish_epoch(self) -> None:
        """At an epoch's end: records the index promises that never came out (a truncated shard's, or bad ones after
        the last good row) are bad too. Without an index for every shard nothing more can be known."""
        expected = self.part.expected
        if not (expected >= 0).all():
            return
        missing = int(expected.sum()) - self.end
        self.state["seen"] += missing
        files = self.part.files
        short = [f for f, n, good in zip(files, expected, self.good_per_file, strict=True) if good < n]
        self.tally(missing, ((short if self.whole else []) or files)[-1])

    def tally(self, bad: int, shard: str | Callable[[], str]) -> None:
        """Counts `bad` more bad records; past the recipe's fraction, stops with the (latest) bad one's shard named."""
        if bad <= 0:
            return
        state, limit = self.state, self.recipe.data.max_bad_fraction
        state["bad"] += bad
        total = state["seen"]
        if total >= MIN_SAMPLES_FOR_BAD_CHECK and state["bad"] / total > limit:
            raise BadDataError(
                f"{self.part.spec.entry}: {state['bad']} of {total} samples on host {self.host.index} were bad"
                f" (undecodable image, empty caption or truncated shard), more than data.max_bad_fraction = {limit};"
                f" the latest in {shard if isinstance(shard, str) else shard()}"
            )


def gap_shard(recipe: Recipe, part: Part, epoch: int, begin: int, ordinals: np.ndarray) -> str:
    """The shard of the last record in [begin, ordinals[-1]] that did not come out (found by reading the epoch's
    record stream again, without decoding: only on the way to an error)."""
    last_missing = max(set(range(begin, int(ordinals[-1]) + 1)) - set(ordinals.tolist()))
    for _, (file, _) in record_stream(recipe, part, epoch, last_missing).take(1).as_numpy_iterator():
        return part.files[int(file)]
    return part.files[-1]


def shard_records(recipe: Recipe, part: Part, file: tf.Tensor) -> tf.data.Dataset:
    """One shard's records: serialized examples, or a tar's (image, alt-text, re-caption) bytes; a damaged shard ends
    early (counted by the index, where there is one)."""
    if part.spec.source == "webdataset":
        from trainer.data import webdataset

        spec = (tf.TensorSpec([None], tf.string),) * 3
        args = (file, recaption_key(recipe, part.spec))  # "": a tar's JSON is not even parsed
        chunks = tf.data.Dataset.from_generator(webdataset.chunks, args=args, output_signature=spec)
        return chunks.unbatch()
    return tf.data.TFRecordDataset(file).ignore_errors()


def record_fields(
    recipe: Recipe, spec: Source, record: tf.Tensor | tuple[tf.Tensor, ...]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(image bytes, alt-text, re-caption: "" when missing or when no caption decoder reads it) of a record of any
    source."""
    if isinstance(record, tuple):
        return record
    recaption = recaption_key(recipe, spec)
    keys = (spec.caption_key, recaption) if recaption else (spec.caption_key,)
    ex = examples.parse(record, keys, image_key=spec.image_key)
    return ex[spec.image_key], ex[spec.caption_key], ex[recaption] if recaption else tf.constant("")


def recaption_key(recipe: Recipe, spec: Source) -> str:
    """The re-caption field to read from a record: "" (none) without a caption decoder."""
    return spec.recaption_key if reads_recaptions(recipe) else ""


def shard_order(part: Part, epoch: int | tf.Tensor) -> tf.Tensor:
    """The indices of this host's shards of a source in `epoch`'s seeded order."""
    key = tf.stack([tf.constant(part.seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.argsort(tf.random.stateless_uniform([len(part.files)], key))


def record_stream(recipe: Recipe, part: Part, epoch: int | tf.Tensor, skip: int | tf.Tensor = 0) -> tf.data.Dataset:
    """(ordinal, (file index, record)) of this host's epoch of a source in the epoch's order, from ordinal `skip` on
    (a record as shard_records gives it).

    The epoch's shards in a seeded order, in windows of data.shard_window: a window's shards are read interleaved and
    shuffled together (a buffer of data.shuffle_buffer, at most the window), the windows one after the other, the next
    one read and its buffer filled while this one is drained. Where every shard's record count is known (an index),
    window w's ordinals start at the records before it, so `skip` starts at its window and reads no earlier one: a
    resume reads at most one window's records, wherever in the epoch it stops. Without counts, one window of every
    shard, `skip` records read and dropped."""
    seed, files = part.seed, part.files
    epoch, skip = tf.cast(epoch, tf.int64), tf.cast(skip, tf.int64)
    order = shard_order(part, epoch)
    counted = bool((part.expected >= 0).all())
    width = min(recipe.data.shard_window, len(files)) if counted else len(files)
    windows = -(-len(files) // width)
    counts = tf.gather(tf.constant(np.maximum(part.expected, 0), tf.int64), order)
    per_window = tf.reduce_sum(tf.reshape(tf.pad(counts, [[0, windows * width - len(files)]]), [windows, width]), 1)
    ends = tf.cumsum(per_window)  # window w holds the ordinals [ends[w] - per_window[w], ends[w])
    first = tf.constant(0, tf.int64)
    if counted:
        first = tf.minimum(tf.searchsorted(ends, skip[None], side="right", out_type=tf.int64)[0], windows - 1)

    def window(w: tf.Tensor) -> tf.data.Dataset:
        chosen = order[w * width : (w + 1) * width]
        names = tf.data.Dataset.from_tensor_slices((chosen, tf.gather(tf.constant(files), chosen)))
        records = names.interleave(
            lambda i, f: shard_records(recipe, part, f).map(lambda *r: (i, r if len(r) > 1 else r[0])),
            cycle_length=min(16, width),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        buffer = tf.constant(recipe.data.shuffle_buffer, tf.int64)
        if counted:  # no bigger than the window: a buffer is filled whole before its first record comes out
            buffer = tf.maximum(tf.minimum(buffer, per_window[w]), 1)
        shuffle_seed = seed * 100_003 + epoch + w * 1_000_000_007  # window 0: the seed of the whole-epoch order
        shuffled = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        start = ends[w] - per_window[w] if counted else tf.constant(0, tf.int64)
        return shuffled.enumerate(start).skip(tf.maximum(skip - start, 0))

    # one window after the other (block_length: all of it), the next one opened beside it so that its shuffle buffer
    # fills while this one's drains, then holds a few records (Dataset.interleave would buffer 2 x block_length: the
    # whole next window; only the experimental form takes buffer_output_elements)
    ahead = tf.data.experimental.parallel_interleave(
        window, cycle_length=2, block_length=2**31, sloppy=False, buffer_output_elements=64, prefetch_input_elements=0
    )
    return tf.data.Dataset.range(first, windows).apply(ahead)


def sample_row(
    recipe: Recipe,
    part: Part,
    resolution: int,
    epoch: tf.Tensor,
    ordinal: tf.Tensor,
    pair: tuple[tf.Tensor, tf.Tensor],
) -> dict[str, tf.Tensor]:
    """One record -> the training row (image crop, the captions untokenized, colour draws); raises on a bad one."""
    d = recipe.data
    file, record = pair
    image_bytes, alt, target = record_fields(recipe, part.spec, record)
    alt = tf.strings.strip(alt)
    tf.debugging.assert_greater(tf.strings.length(alt), 0, "empty caption")
    sample_seed = tf.stack([tf.constant(part.seed, tf.int64) * 7919 + epoch, ordinal])
    image = preprocess.train_image(image_bytes, resolution, sample_seed, d.crop_min_area, d.antialias, d.scaled_decode)
    source = tf.constant(part.index, tf.int64)
    row = {"images": image, "texts": alt, "epoch": epoch, "ordinal": ordinal, "file": file, "source": source}
    target = tf.strings.strip(target)
    if wants_captions(recipe):
        row["captions"] = tf.where(tf.strings.length(target) > 0, target, alt)  # none: the decoder learns the alt-text
    if recipe.loss.contrast_recaption:  # the second text to contrast with: a sentence of it (none: the alt-text)
        row["recaption_texts"] = preprocess.random_sentence(target, alt, sample_seed)
    if d.color_jitter > 0:
        row["colour"] = preprocess.colour_draws(sample_seed)
    return row


def preflight(recipe: Recipe, part: Part, resolution: int, probe: int = 32) -> None:
    """Reads the first records of the host's first shard of a source: if none of them is usable (a wrong image or
    caption key or data.source, an empty shard), one clear error now, instead of a stream that never yields."""
    spec, shard = part.spec, part.files[0]
    reason = "it holds no records"
    for record in shard_records(recipe, part, tf.constant(shard)).take(probe):
        if not isinstance(record, tuple):
            keys = sorted(tf.train.Example.FromString(record.numpy()).features.feature)
            if spec.image_key not in keys:
                reason = f'it has no image under {spec.key("image_key")} = "{spec.image_key}" (keys: {keys})'
                continue
        try:
            sample_row(recipe, part, resolution, tf.constant(0, tf.int64), tf.constant(0, tf.int64), (0, record))
            return
        except tf.errors.InvalidArgumentError as error:
            if "empty caption" not in error.message:
                reason = f"the image does not decode ({str(error.message).splitlines()[0]})"
            elif isinstance(record, tuple):
                reason = "the samples' .txt members (the alt-text) are empty or missing"
            else:
                reason = f'the caption under {spec.key("caption_key")} = "{spec.caption_key}" is empty (keys: {keys})'
    raise BadDataError(f"{spec.entry}: no usable sample among the first {probe} of {shard}: {reason}")


def endless_stream(
    recipe: Recipe,
    resolution: int,
    tokenizer: Tokenizer,
    parts: list[Part],
    starts: list[tuple[int, int]],
    draws: int | None,
    size: int,
) -> tf.data.Dataset:
    """The good rows of this host's epochs, each source from its (epoch, records skipped) start, mixed by the draws
    from `draws` on (None: one source, unmixed), in batches of `size`, each row with its source, epoch, ordinal and
    file index. One dataset for all epochs: the decoding keeps going across an epoch's end (a pipeline per epoch
    drained and refilled there; on small datasets that was a third of the time), and a batch may hold the end of one
    epoch and the start of the next."""
    t = recipe.text

    def tokenize(chunk: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        tokens = {"texts": tokenizer.batch(chunk["texts"], t.context_length)}
        if "captions" in chunk:
            tokens["captions"] = tokenizer.captions(chunk["captions"], t.caption_length)
        if "recaption_texts" in chunk:
            tokens["recaption_texts"] = tokenizer.batch(chunk["recaption_texts"], t.context_length)
        return {**chunk, **tokens}

    streams = [source_rows(recipe, resolution, part, *start) for part, start in zip(parts, starts, strict=True)]
    rows = streams[0] if draws is None else mix(recipe, parts, streams, draws)
    batched = rows.batch(size, drop_remainder=True)
    return batched.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def source_rows(recipe: Recipe, resolution: int, part: Part, epoch: int, skip: int) -> tf.data.Dataset:
    """A source's good rows from `epoch` on, after that epoch's first `skip` records."""
    row = partial(sample_row, recipe, part, resolution)

    def epoch_records(e: tf.Tensor) -> tf.data.Dataset:
        records = record_stream(recipe, part, e, tf.where(e == epoch, tf.constant(skip, tf.int64), 0))
        return records.map(lambda ordinal, pair: (e, ordinal, pair))

    records = tf.data.Dataset.range(epoch, 2**62).flat_map(epoch_records)
    # a row whose decoding fails (bad image, empty caption) is dropped here; its ordinal's absence tells
    return records.map(row, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()


def mix(recipe: Recipe, parts: list[Part], streams: list[tf.data.Dataset], draws: int) -> tf.data.Dataset:
    """The sources' rows interleaved by weighted draws, from draw `draws` on: draw i depends on (seed, i) alone."""
    weights = np.array([p.spec.weight for p in parts], np.float64)
    logits = tf.constant(np.log(weights / weights.sum())[None], tf.float32)
    seed = tf.constant(recipe.data.seed, tf.int64)

    def choose(i: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_categorical(logits, 1, seed=tf.stack([seed, i]), dtype=tf.int64)[0, 0]

    choices = tf.data.Dataset.range(draws, 2**62).map(choose)
    return tf.data.Dataset.choose_from_datasets(streams, choices)
