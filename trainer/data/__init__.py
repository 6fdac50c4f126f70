"""Training data: each host reads its own share of every global batch, resumably.

The loop only knows this interface. `open_stage(...)` returns an iterator of `(batch, position)`: `batch` is this
host's slice of the next global batch (numpy: images uint8 (b, H, W, 3), texts int32 (b, L) alt-text ids, captions
int32 (b, T) re-caption ids (from shards: for a model with a caption decoder only), 0 = padding; with colour jitter
on, colour float32 (b, JITTER_DRAWS)), `position` is a JSON-able dict that, passed back to `open_stage`, restarts
the stream right after that batch. Positions travel with the batches (not read off the iterator) because a source may
prefetch ahead: the loop checkpoints the position of the last batch it trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.recipe import Recipe

Batch = dict[str, np.ndarray]
JITTER_DRAWS = 10  # a batch's `colour`: uniforms per sample that trainer.augment turns into its colour jitter
Position = dict[str, Any]


@dataclass(frozen=True)
class Host:
    """Which share of the global batch this process reads."""

    index: int = 0
    count: int = 1

    def share(self, global_batch: int) -> slice:
        size = global_batch // self.count
        return slice(self.index * size, (self.index + 1) * size)


def wants_captions(recipe: Recipe) -> bool:
    """Only a caption decoder reads the re-captions whole: without one, no source yields them."""
    return bool(recipe.model.decoder)


def reads_recaptions(recipe: Recipe) -> bool:
    """The re-captions are read for a caption decoder or for loss.contrast_recaption's sentence; otherwise no source
    reads or parses them."""
    return wants_captions(recipe) or recipe.loss.contrast_recaption


def open_stage(
    recipe: Recipe, stage_index: int, host: Host, position: Position | None = None
) -> Iterator[tuple[Batch, Position]]:
    """The stage's batches for this host, from the start or right after `position`."""
    source = recipe.data.source
    if source == "synthetic" and not recipe.data.mixture:
        from trainer.data import synthetic

        return synthetic.batches(recipe, stage_index, host, position)
    if source in ("tfrecord", "webdataset", "tfds") or recipe.data.mixture:
        from trainer.data import tfdata

        return tfdata.batches(recipe, stage_index, host, position)
    raise NotImplementedError(f"data.source = {source!r} is not implemented yet; use tfrecord, tfds or webdataset")


def gather_positions(position: Position, host: Host) -> list[Position]:
    """Every host's position, in host order, on every host (a collective: all hosts call it together)."""
    if host.count == 1:
        return [position]
    from jax.experimental import multihost_utils

    raw = json.dumps(position).encode()
    sizes = multihost_utils.process_allgather(np.array([len(raw)]))
    padded = np.frombuffer(raw.ljust(int(np.max(sizes))), np.uint8)
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).decode()) for row in np.asarray(gathered).reshape(host.count, -1)]


def my_position(saved: list[Position], host: Host, say: Callable[[str], None]) -> Position | None:
    """This host's saved position. Saved by another number of hosts, the streams cannot be mapped (each host reads
    its own files) unless they are all the same (the synthetic source): then the stage's data starts over."""
    if len(saved) == host.count:
        return saved[host.index]
    if all(p == saved[0] for p in saved):
        return saved[0]
    say(f"data positions of {len(saved)} hosts cannot be mapped onto {host.count}: the stage's data starts over")
    return None
