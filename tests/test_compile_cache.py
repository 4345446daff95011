"""The workdir's persistent compilation cache (``vgg_jax/compile_cache.py``) under faults."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from vgg_jax import compile_cache


def _program(x):
    return jnp.sin(x) * 3.0 + jnp.cos(x) / 7.0  # not compiled by any other test


class DamagedEntryTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        # The suite sets one cache for the session (conftest.py); these tests use the workdir's.
        self.addCleanup(
            jax.config.update, "jax_compilation_cache_dir", jax.config.jax_compilation_cache_dir
        )
        jax.config.update("jax_compilation_cache_dir", None)
        self.workdir = self.create_tempdir().full_path

    def compile_once(self) -> tuple[int, int]:
        """Compiles ``_program`` as a fresh process would (nothing in memory); returns how many
        programs were compiled and loaded from the cache."""
        jax.clear_caches()
        before = compile_cache.program_counts()
        with compile_cache.workdir_cache(self.workdir):
            jax.jit(_program)(np.arange(5, dtype=np.float32)).block_until_ready()
        after = compile_cache.program_counts()
        return after[0] - before[0], after[1] - before[1]

    def test_an_entry_cut_short_is_compiled_and_written_again(self):
        """A full disk left a 0-byte entry (JAX writes in place and never rewrites an entry that
        exists): every later run warned "Error reading persistent compilation cache entry" and
        compiled the program again, for good."""
        self.assertEqual(self.compile_once(), (1, 0))
        cache = os.path.join(self.workdir, compile_cache.CACHE_DIR)
        (entry,) = [os.path.join(cache, name) for name in os.listdir(cache)]
        whole = os.path.getsize(entry)
        for cut in (0, whole // 2):  # ENOSPC at the first write, or part way
            with open(entry, "r+b") as f:
                f.truncate(cut)
            old = time.time() - 2 * compile_cache.WRITING_S
            os.utime(entry, (old, old))
            with self.assertLogs("absl", "WARNING") as logs:
                self.assertEqual(self.compile_once(), (1, 0))
            self.assertIn("Removed 1 damaged entries from the compilation cache", logs.output[0])
            self.assertIn("jit__program", logs.output[0])
            self.assertGreater(os.path.getsize(entry), whole // 2)  # written again
            self.assertEqual(self.compile_once(), (0, 1))  # and read

    def test_an_entry_being_written_is_left_alone(self):
        self.compile_once()
        cache = os.path.join(self.workdir, compile_cache.CACHE_DIR)
        (entry,) = [os.path.join(cache, name) for name in os.listdir(cache)]
        with open(entry, "r+b") as f:
            f.truncate(0)  # as another process sharing the workdir has it, mid-write
        self.assertEqual(compile_cache._remove_damaged(cache), [])
        self.assertTrue(os.path.exists(entry))


if __name__ == "__main__":
    absltest.main()
