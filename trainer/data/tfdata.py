"""The training input pipeline over TFRecord or webdataset shards (tf.data), resumable at the exact sample.

Per host and epoch: this host's files (every `count`-th of the sorted list) in a seeded order, read interleaved,
a seeded shuffle buffer of serialized records, then each record numbered (its ordinal in the host's epoch stream),
parsed, decoded, cropped and tokenized in parallel, in order. The position is (epoch, ordinals consumed): a resumed
run rebuilds the same stream and skips the consumed records before anything is decoded.

A bad sample (undecodable image, empty caption) is not dropped silently: its decoding fails inside a one-element
dataset that then yields a marker row instead (ok = False, with the shard's name), so every record comes out, good or
bad, and bad ones are counted per host. A truncated shard ends early; with the shard set's index (record counts) the
missing records are counted against that shard at the end of the epoch. Past `data.max_bad_fraction` the run stops
with an error naming the shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from trainer.data import Batch, Host, Position, examples, preprocess
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import WordPiece
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


def tokenizer_for(recipe: Recipe) -> WordPiece:
    if recipe.text.tokenizer != "bert_wordpiece":
        raise RecipeError(f'text.tokenizer = "{recipe.text.tokenizer}" is not supported yet; use "bert_wordpiece"')
    if not recipe.text.vocab:
        raise RecipeError(
            "text.vocab is empty: give a WordPiece vocab file (OpenVision uses bert-base-uncased's vocab.txt) or"
            " build one: python -m trainer.data.prepare vocab SHARDS --out vocab.txt"
        )
    try:
        tokenizer = WordPiece(recipe.text.vocab)
    except FileNotFoundError:
        raise RecipeError(f'text.vocab = "{recipe.text.vocab}" does not exist') from None
    if tokenizer.size > recipe.text.vocab_rows:
        rows, vocab = recipe.text.vocab_rows, recipe.text.vocab
        raise RecipeError(f"text.vocab_rows = {rows} is less than the {tokenizer.size} entries of {vocab}")
    return tokenizer


def batches(
    recipe: Recipe, stage_index: int, host: Host, position: Position | None
) -> Iterator[tuple[Batch, Position]]:
    stage = recipe.stages[stage_index]
    files = list_files(recipe.data.train, "data.train")
    mine = files[host.index :: host.count]
    if not mine:
        raise RecipeError(f"data.train has {len(files)} files for {host.count} hosts: every host needs at least one")
    tokenizer = tokenizer_for(recipe)
    expected = {f: n for f, n in examples.read_index(mine).items() if f in mine}
    # seen / bad: records (and bad ones) of this host's stream up to the position, so a resumed run counts alike
    state = dict(position or {"epoch": 0, "consumed": 0, "seen": 0, "bad": 0})
    rows = Rows(stage.global_batch // host.count)
    while True:
        per_file: Counter[str] = Counter()
        from_start = int(state["consumed"]) == 0
        stream = epoch_stream(recipe, stage.resolution, tokenizer, mine, int(state["epoch"]), int(state["consumed"]))
        for chunk in stream.as_numpy_iterator():
            chunk["file"] = np.array([f.decode() for f in chunk["file"]], dtype=object)
            per_file.update(chunk["file"])
            rows.add(chunk)
            while rows.ready():
                batch, consumed, bad_files = rows.take()
                state["seen"] += consumed - int(state["consumed"])
                state["consumed"] = consumed
                for name in bad_files:
                    count_bad(recipe, state, name, host)
                yield batch, dict(state)
        leftover, bad_files = rows.drain()  # rows past the last full batch: dropped with their epoch, counted
        state["seen"] += leftover
        for name in bad_files:
            count_bad(recipe, state, name, host)
        if from_start:  # the whole epoch was read: a shard that gave fewer records than its index says was truncated
            for name, count in expected.items():
                for _ in range(count - per_file[name]):
                    state["seen"] += 1
                    count_bad(recipe, state, name, host)
        state["epoch"] = int(state["epoch"]) + 1
        state["consumed"] = 0


def count_bad(recipe: Recipe, state: dict[str, Any], shard: str, host: Host) -> None:
    state["bad"] += 1
    total = state["seen"]
    if total >= MIN_SAMPLES_FOR_BAD_CHECK and state["bad"] / total > recipe.data.max_bad_fraction:
        raise BadDataError(
            f"data: {state['bad']} of {total} samples on host {host.index} were bad (undecodable image, empty"
            f" caption or truncated shard), more than data.max_bad_fraction = {recipe.data.max_bad_fraction};"
            f" the latest in {shard}"
        )


class Rows:
    """The stream's rows in order, good and bad, handed out as batches of exactly `size` good rows; a batch consumes
    every row up to its last good one (the bad ones among them are reported)."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[dict[str, np.ndarray]] = []
        self.good = 0

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        self.parts.append(chunk)
        self.good += int(chunk["ok"].sum())

    def ready(self) -> bool:
        return self.good >= self.size

    def take(self) -> tuple[Batch, int, list[str]]:
        """(batch, ordinals consumed so far in the epoch, shards of the bad rows consumed)."""
        rows = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        cut = int(np.flatnonzero(rows["ok"])[self.size - 1]) + 1
        head = {k: v[:cut] for k, v in rows.items()}
        rest = {k: v[cut:] for k, v in rows.items()}
        self.parts = [rest] if len(rest["ok"]) else []
        self.good -= self.size
        ok = head["ok"]
        batch = {k: head[k][ok] for k in ("images", "texts", "captions")}
        return batch, int(head["ordinal"][-1]) + 1, list(head["file"][~ok])

    def drain(self) -> tuple[int, list[str]]:
        """At an epoch's end: how many rows are left and the shards of the bad ones; forgets them."""
        rows = {k: np.concatenate([p[k] for p in self.parts]) for k in ("ok", "file")} if self.parts else None
        self.parts, self.good = [], 0
        if rows is None:
            return 0, []
        return len(rows["ok"]), list(rows["file"][~rows["ok"]])


def shard_records(recipe: Recipe, file: tf.Tensor) -> tf.data.Dataset:
    """One shard's serialized examples; a damaged shard ends early (counted by the index, where there is one)."""
    if recipe.data.source == "webdataset":
        from trainer.data import webdataset

        args = (file, recipe.data.caption_key, recipe.data.recaption_key)
        spec = tf.TensorSpec((), tf.string)
        return tf.data.Dataset.from_generator(webdataset.records, args=args, output_signature=spec)
    return tf.data.TFRecordDataset(file).ignore_errors()


def epoch_stream(
    recipe: Recipe, resolution: int, tokenizer: WordPiece, files: list[str], epoch: int, skip: int
) -> tf.data.Dataset:
    """Every record of this host's epoch after the first `skip`, as rows (good or marked bad), in chunks."""
    d, t = recipe.data, recipe.text
    seed = d.seed
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    names = tf.data.Dataset.from_tensor_slices([files[i] for i in order])
    records = names.interleave(
        lambda f: shard_records(recipe, f).map(lambda r: (f, r)),
        cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    records = records.shuffle(d.shuffle_buffer, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
    records = records.enumerate().skip(skip)
    caption_keys = (d.caption_key, d.recaption_key) if d.recaption_key else (d.caption_key,)
    blank = {
        "images": tf.zeros((resolution, resolution, 3), tf.uint8),
        "texts": tf.constant(""),
        "captions": tf.constant(""),
    }

    def row(ordinal: tf.Tensor, file: tf.Tensor, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = examples.parse(serialized, caption_keys)
        alt = tf.strings.strip(ex[d.caption_key])
        target = tf.strings.strip(ex[d.recaption_key]) if d.recaption_key else alt
        target = tf.where(tf.strings.length(target) > 0, target, alt)  # no re-caption: the decoder learns the alt-text
        tf.debugging.assert_greater(tf.strings.length(alt), 0, "empty caption")
        sample_seed = tf.stack([tf.constant(seed, tf.int64) * 7919 + epoch, ordinal])
        image = preprocess.train_image(ex[examples.IMAGE], resolution, sample_seed, d.crop_min_area, d.color_jitter)
        return {
            "images": image,
            "texts": alt,  # tokenized per batch below: one vectorized call instead of one per sample
            "captions": target,
            "ok": tf.constant(True),
            "ordinal": ordinal,
            "file": file,
        }

    def one(ordinal: tf.Tensor, pair: tuple[tf.Tensor, tf.Tensor]) -> tf.data.Dataset:
        file, serialized = pair
        marker = {**blank, "ok": tf.constant(False), "ordinal": ordinal, "file": file}
        good = tf.data.Dataset.from_tensors((ordinal, file, serialized)).map(row).ignore_errors()
        return good.concatenate(tf.data.Dataset.from_tensors(marker)).take(1)

    def tokenize(chunk: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        texts = tokenizer.batch(chunk["texts"], t.context_length)
        return {**chunk, "texts": texts, "captions": tokenizer.batch(chunk["captions"], t.caption_length)}

    rows = records.interleave(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return rows.batch(256).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
