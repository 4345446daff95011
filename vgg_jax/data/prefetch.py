"""Iterators filled by a background thread: the host's input work overlaps the device's.

Imports neither TensorFlow nor JAX, so the evaluator can start its next test scale's input ahead
without loading the pipeline modules.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_DONE = object()


class Prefetched(Iterator):
    """The items of ``iterable``, produced by a background thread ``size`` items ahead from the
    moment this object is created (e.g. global batches put on the device while the previous step
    runs, or the next test scale's input pipeline started while this scale computes). A producer's
    error is raised to the consumer at the item where it happened. The thread stops at
    ``close()`` or when this object is garbage-collected (it is a daemon either way, so an
    unfinished one never blocks exit)."""

    def __init__(self, iterable: Iterable, size: int):
        self._items: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._finished = False
        # The thread holds the queue and the event, not this object, so dropping the consumer
        # stops it (``__del__``).
        thread = threading.Thread(
            target=_produce, args=(iterable, self._items, self._stop), daemon=True
        )
        thread.name = "vgg_jax-prefetch"
        thread.start()

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._items.get()
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()

    def __del__(self):
        self._stop.set()


def _produce(iterable: Iterable, items: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in iterable:
            if not put(item):
                return
        put(_DONE)
    except BaseException as error:  # re-raised in the consumer
        put(error)
