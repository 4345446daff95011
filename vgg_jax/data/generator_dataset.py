"""``tf.data.Dataset.from_generator`` without the allocator setting it makes for the whole process.

The first ``from_generator`` iterator of a process sets glibc's ``M_TRIM_THRESHOLD`` to 128 KB
(TensorFlow's log line "Memory patch applied: M_TRIM_THRESHOLD=128 kb was set"). Setting it turns
off glibc's adaptive mmap threshold, so from then on every allocation of 128 KB or more is mapped
fresh and unmapped on free: every XLA:CPU program page-faults its buffers in again on every call.
The demo's train step went from 14.2 to 20.0 ms (4,700 page faults a step, 9-11 ms of system
time), and the README's run made 23 million page faults (docs/performance.md, "The allocator
TensorFlow sets").
TensorFlow makes the setting once per process, when the first such iterator is made; so before the
first dataset this module makes one from an empty generator, lets TensorFlow set it, and then sets
glibc's thresholds to where its adaptive rule settles (mmap above 32 MB, trim above 64 MB).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

# glibc's mallopt parameters (malloc.h) and the adaptive rule's ceiling on 64-bit machines.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES

_lock = threading.Lock()
_settled: bool | None = None  # None: not yet; else whether glibc's thresholds were set


def from_generator(
    generator: Callable[[], Iterator[Any]], output_signature: Any
) -> tf.data.Dataset:
    """``tf.data.Dataset.from_generator(generator, output_signature=...)``, after TensorFlow's
    allocator setting has been made and replaced (once per process)."""
    settle_allocator()
    return tf.data.Dataset.from_generator(generator, output_signature=output_signature)


def settle_allocator() -> bool:
    """Makes TensorFlow apply its ``M_TRIM_THRESHOLD`` setting now (an empty generator's
    iterator), then sets glibc's mmap and trim thresholds to its adaptive rule's ceilings. Once
    per process; False where there is no glibc ``mallopt`` (macOS, Windows)."""
    global _settled
    with _lock:
        if _settled is not None:
            return _settled
        empty = tf.data.Dataset.from_generator(
            lambda: iter(()), output_signature=tf.TensorSpec([], tf.int8)
        )
        for _ in empty:  # the iterator is what makes TensorFlow's setting
            pass
        mallopt = _glibc_mallopt()
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        _settled = mallopt is not None
        return _settled


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
