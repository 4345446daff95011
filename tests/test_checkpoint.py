"""checkpoint: reading a workdir that a running trainer is writing and pruning."""

from unittest import mock

import numpy as np
from absl.testing import absltest

from vgg_jax import checkpoint


class ReadWhileTrainingTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.workdir = self.create_tempdir().full_path
        params = {"dense": {"kernel": np.ones((2, 3), np.float32)}}
        checkpoint.save_params(self.workdir, params, step=7)

    def listed_with_one_prune(self, raised: type[Exception]) -> tuple[list[int], int]:
        """``available_steps`` when Orbax's first listing raises ``raised``: (steps, calls)."""
        real_manager = checkpoint.ocp.CheckpointManager
        calls = []

        def pruned_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise raised("checkpoints/1")
            return real_manager(*args, **kwargs)

        with mock.patch.object(checkpoint.ocp, "CheckpointManager", side_effect=pruned_once):
            return checkpoint.available_steps(self.workdir), len(calls)

    def test_a_step_deleted_during_listing_is_retried(self):
        # What Orbax raises when keep-last-K removes a listed step; NotADirectoryError when the
        # step goes between its ``exists`` and ``is_dir`` (seen once in CI, in a test's poll).
        for raised in (FileNotFoundError, NotADirectoryError):
            with self.subTest(raised.__name__):
                self.assertEqual(self.listed_with_one_prune(raised), ([7], 2))

    def test_a_directory_that_stays_broken_still_raises(self):
        with (
            mock.patch.object(
                checkpoint.ocp, "CheckpointManager", side_effect=FileNotFoundError("gone")
            ) as manager,
            self.assertRaises(FileNotFoundError),
        ):
            checkpoint.available_steps(self.workdir)
        self.assertEqual(manager.call_count, checkpoint.READ_RETRIES)


class ClassDifferenceTest(absltest.TestCase):
    def test_names_in_either_unicode_form_are_the_same_class(self):
        # "café" written composed (Linux) and decomposed (a folder copied from a Mac).
        composed, decomposed = "caf\u00e9", "cafe\u0301"
        self.assertIsNone(checkpoint.class_difference(["ant", composed], ["ant", decomposed]))

    def test_a_different_name_is_named_as_written(self):
        difference = checkpoint.class_difference(["ant", "cafe\u0301"], ["ant", "bee"])
        self.assertEqual(difference, "class 1: 'cafe\u0301' there, 'bee' here")
        self.assertEqual(
            checkpoint.class_difference(["ant"], ["ant", "bee"]), "class 1: None there, 'bee' here"
        )


if __name__ == "__main__":
    absltest.main()
