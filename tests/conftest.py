"""Test-session settings, applied before JAX is imported.

- Every test process sees four CPU devices, so sharding code runs on a real multi-device mesh
  (big_vision and the Flax examples test this way).
- XLA compiles without LLVM's optimisation passes (``--xla_backend_optimization_level=0``): the
  suite's nets are tiny, so it spends most of its time compiling, and this halves that. The
  programs and their numerics are XLA's own (no fast-math either way); only the machine code is
  slower, which the benches measure, not the tests. Subprocesses inherit the flags.
- One persistent compilation cache for the whole session (``JAX_COMPILATION_CACHE_DIR``, which
  ``vgg_jax.compile_cache`` uses instead of each workdir's): the many tiny training and
  evaluation runs, in this process, in pytest-xdist's workers and in the subprocesses they start,
  compile each program once. It is removed when the session ends.
- The slow tests (subprocesses, multi-process runs) are collected first, so that with pytest-xdist
  (``-n``, in ``pyproject.toml``) they start early instead of ending the run on one worker.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vgg_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# absltest's helpers (create_tempdir and friends) read absl flags; pytest does not parse them.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

MAX_WORKERS = 4  # each worker holds its own JAX, TensorFlow and tiny dataset in memory


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most ``MAX_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cores or 1))
