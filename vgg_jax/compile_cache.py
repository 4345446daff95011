"""XLA's persistent compilation cache in the workdir: a second run of the same training or
evaluation loads its programs instead of compiling them (the demo's evaluation compiles a few
dozen, one per method and bucket shape; training compiles the step, the batch function and the
validation step). The cache is keyed by the program, the compiler options and the jaxlib version,
so a stale entry is never used; delete ``<workdir>/xla_cache`` to reclaim the space.

JAX writes an entry in place and never writes one that exists again, so an entry cut short (a
full disk, a kill while writing) was read by every later run, which warned ("Error reading
persistent compilation cache entry ... truncated stream") and compiled it again, for good. The
workdir's cache drops such entries when a run starts (``_remove_damaged``).

A cache directory set before the run (``JAX_COMPILATION_CACHE_DIR``, or
``jax.config.update("jax_compilation_cache_dir", ...)``) is used instead of the workdir's: one
cache for many workdirs (sweeps, the test suite, a shared disk on a cluster).
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Iterator

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

CACHE_DIR = "xla_cache"
ENTRY_SUFFIX = "-cache"  # JAX's name for an entry's file (jax/_src/lru_cache.py)
WRITING_S = 60.0  # an entry newer than this may still be being written by another run's process


_active: list[str] = []  # the cache directories of the workdir_cache blocks we are inside


@contextlib.contextmanager
def workdir_cache(workdir: str) -> Iterator[str]:
    """While inside, JAX's persistent compilation cache is ``<workdir>/xla_cache`` (every program,
    however quick to compile: the demo's are each under a few seconds but many); the previous
    setting comes back on exit, so a process that later deletes the workdir (tests, notebooks)
    does not keep writing into it. Nested blocks keep the outermost directory: the study's runs
    (one workdir each) share the study's cache, where a net's seeds compile to the same programs.
    A directory the user set before (module docstring) is kept the same way."""
    if _active:
        yield _active[0]
        return
    path = jax.config.jax_compilation_cache_dir
    if not path:
        path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CACHE_DIR)
        os.makedirs(path, exist_ok=True)
        _remove_damaged(path)
    previous = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    _point_at(path, 0.0)
    _active.append(path)
    try:
        yield path
    finally:
        _active.pop()
        _point_at(*previous)


def _decompressor():
    """JAX's own reader of an entry's bytes (zstd or zlib, as it wrote them); None if a JAX
    release moves it (requirements.txt pins JAX), and then nothing is checked."""
    try:
        from jax._src import compilation_cache as jax_cache
    except ImportError:
        return None
    return getattr(jax_cache, "decompress_executable", None)


def _remove_damaged(path: str) -> list[str]:
    """Removes the entries of the cache ``path`` whose bytes do not decompress (cut short by a
    full disk or a kill), saying so in one warning; returns their names. Entries written in the
    last ``WRITING_S`` seconds are left alone: an evaluator and a trainer share a workdir."""
    decompress = _decompressor()
    if decompress is None:
        return []
    damaged = []
    for entry in sorted(glob.glob(os.path.join(glob.escape(path), f"*{ENTRY_SUFFIX}"))):
        try:
            if time.time() - os.stat(entry).st_mtime < WRITING_S:
                continue
            with open(entry, "rb") as f:
                data = f.read()
        except OSError:  # gone meanwhile, or unreadable: JAX says so when it reads it
            continue
        try:
            decompress(data)
        except Exception:  # zlib.error, zstd's ZstdError: an entry cut short
            with contextlib.suppress(OSError):
                os.remove(entry)
            damaged.append(os.path.basename(entry))
    if damaged:
        logging.warning(
            "Removed %d damaged entries from the compilation cache %s (cut short: a full disk or "
            "a kill while writing); they are compiled again: %s",
            len(damaged),
            path,
            ", ".join(sorted({name.split("-")[0] for name in damaged})),
        )
    return damaged


def _point_at(path: str | None, min_compile_time_secs: float) -> None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # the next compilation opens the new directory


class _Counts:
    compiled = 0  # programs XLA compiled (not found in the persistent cache)
    loaded = 0  # programs loaded from the persistent cache


def _count(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_misses":
        _Counts.compiled += 1
    elif event == "/jax/compilation_cache/cache_hits":
        _Counts.loaded += 1


jax.monitoring.register_event_listener(_count)


def program_counts() -> tuple[int, int]:
    """``(compiled, loaded)``: programs this process compiled with the persistent cache on but
    not found in it, and programs it loaded from the cache. Differences between two calls count
    what happened in between."""
    return _Counts.compiled, _Counts.loaded
