"""Exact resume: training batches are a pure function of (seed, step), on one process and two."""

import itertools

import jax
import ml_collections
import numpy as np
from absl.testing import absltest

from tests import fixtures
from vgg_jax import data, sharding
from vgg_jax.data import index, pipeline, sources


def take(iterator, count):
    return list(itertools.islice(iterator, count))


class ResumeTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # 100 examples in batches of 16: epochs end inside steps 6, 12, 18.
        cls.config = fixtures.tiny_config(**{"input.shuffle_seed": 3})

    def batches(self, start, count, process_index=0, process_count=1, config=None):
        iterator = data.train_batches(
            config or self.config,
            start,
            process_index=process_index,
            process_count=process_count,
        )
        return take(iterator, count)

    def assert_same(self, first, second):
        self.assertLen(first, len(second))
        for a, b in zip(first, second, strict=True):
            self.assertEqual(a.keys(), b.keys())
            for key in a:
                self.assertEqual(a[key].dtype, b[key].dtype)
                np.testing.assert_array_equal(a[key], b[key])  # bitwise for float32 too

    def test_restart_yields_the_uninterrupted_batches(self):
        uninterrupted = self.batches(0, 9)
        self.assertEqual(data.steps_per_epoch(self.config), 6)
        self.assert_same(self.batches(5, 4), uninterrupted[5:9])  # crosses an epoch boundary
        self.assert_same(self.batches(8, 1), uninterrupted[8:9])
        first = uninterrupted[0]
        self.assertEqual(first["image"].shape, (16, 32, 32, 3))
        self.assertEqual(first["image"].dtype, np.float32)
        self.assertEqual(first["label"].dtype, np.int32)

    def test_local_batches_become_one_global_array_sharded_over_data(self):
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, model=1)))
        batch = sharding.global_batch(self.batches(2, 1)[0], mesh)
        self.assertEqual(batch["image"].shape, (16, 32, 32, 3))
        self.assertEqual(batch["image"].sharding.spec[0], sharding.DATA)
        self.assertLen(batch["label"].addressable_shards, len(jax.devices()))

    def test_another_seed_gives_other_batches(self):
        other = self.config.copy_and_resolve_references()
        other.input.shuffle_seed = 4
        a, b = self.batches(0, 1)[0], self.batches(0, 1, config=other)[0]
        self.assertFalse(
            np.array_equal(a["label"], b["label"]) and np.allclose(a["image"], b["image"])
        )

    def test_two_process_shards_restart_and_assemble_the_global_batch(self):
        whole = self.batches(4, 3)
        shards = [self.batches(4, 3, process_index=i, process_count=2) for i in range(2)]
        for step, batch in enumerate(whole):
            for key in batch:
                joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
                np.testing.assert_array_equal(joined, batch[key])
        # A shard restarted later equals the same shard run from earlier.
        later = self.batches(5, 2, process_index=1, process_count=2)
        self.assert_same(later, shards[1][1:3])

    def test_every_example_once_per_epoch(self):
        order = pipeline.TrainOrder(100, seed=3)
        positions = np.arange(300)
        rows = order.rows(positions).reshape(3, 100)
        for epoch_rows in rows:
            np.testing.assert_array_equal(np.sort(epoch_rows), np.arange(100))
        self.assertFalse(np.array_equal(rows[0], rows[1]))
        # Step slices of processes partition each global batch's positions.
        local = [pipeline.train_positions(7, 16, i, 4) for i in range(4)]
        np.testing.assert_array_equal(np.concatenate(local), np.arange(7 * 16, 8 * 16))

    def test_labels_follow_the_order(self):
        split_index = index.load_index(sources.prepared_builder(self.config.input), "train")
        order = pipeline.TrainOrder(len(split_index.valid), 3)
        batches = self.batches(0, 7)  # 112 positions: all 100 examples of epoch 0
        labels = np.concatenate([b["label"] for b in batches])
        expected = split_index.label[split_index.valid[order.rows(np.arange(112))]]
        np.testing.assert_array_equal(labels, expected)


if __name__ == "__main__":
    absltest.main()
