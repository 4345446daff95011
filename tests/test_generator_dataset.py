"""After the project's first ``from_generator`` dataset, XLA:CPU programs do not page-fault their
buffers in on every call (vgg_jax/data/generator_dataset.py). Each case runs in a fresh process:
TensorFlow's allocator setting is made once per process."""

import json
import subprocess
import sys
import textwrap

from absl.testing import absltest

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp
    import tensorflow as tf
    from vgg_jax.data import generator_dataset

    product = jax.jit(jnp.tanh)  # a fresh 16 MB result on every call
    x = jnp.ones((2048, 2048))

    def faults_per_call(calls=40):
        product(x).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            product(x).block_until_ready()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls

    make = (generator_dataset.from_generator if sys.argv[1] == "project"
            else tf.data.Dataset.from_generator)
    dataset = make(lambda: iter(range(3)), output_signature=tf.TensorSpec([], tf.int64))
    values = [int(v) for v in dataset.as_numpy_iterator()]
    print(json.dumps({"values": values, "faults": faults_per_call()}))
    """
)


def run(which: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, which], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


class GeneratorDatasetTest(absltest.TestCase):
    def test_no_page_faults_per_call_after_the_first_dataset(self):
        tensorflow_alone = run("tensorflow")
        if tensorflow_alone["faults"] < 500:
            self.skipTest(
                "This TensorFlow no longer sets M_TRIM_THRESHOLD: the module's work is not "
                f"needed ({tensorflow_alone['faults']:.0f} faults a call without it)."
            )
        ours = run("project")
        self.assertEqual(ours["values"], [0, 1, 2])
        # A fresh 16 MB result is 4,096 pages: with TensorFlow's setting each call faults them
        # all in; with glibc's thresholds the heap keeps them.
        self.assertLess(ours["faults"], tensorflow_alone["faults"] / 5)


if __name__ == "__main__":
    absltest.main()
