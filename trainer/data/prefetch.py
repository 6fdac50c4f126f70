"""Batches made ready in a background thread while the devices train on the previous ones.

Taking a batch off a tf.data iterator and turning it into global device arrays is Python work (a few ms per step): in
the loop's thread it sits between two steps, here it overlaps them (as flax's prefetch_to_device and big_vision's
prefetch do). An error in the source (bad data, a recipe mistake found late) is raised in the loop's thread at the
batch where it happened; the thread stops when the loop stops taking batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class Prefetched:
    """Iterator over `transform(batch), position` of `source`, `size` ahead. Use as a context manager (or call
    close()) so the thread stops when the loop leaves early (preemption, an error)."""

    def __init__(self, source: Iterator[tuple[Any, Any]], transform: Callable[[Any], Any], size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source, transform), name="prefetch", daemon=True)
        self._thread.start()

    def _fill(self, source: Iterator[tuple[Any, Any]], transform: Callable[[Any], Any]) -> None:
        try:
            for batch, position in source:
                if not self._put((transform(batch), position)):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the loop's thread, raised there
            self._put(error)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> tuple[Any, Any]:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stays ended
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
