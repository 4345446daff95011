"""The bench scripts run as their docs say (a smoke run each, nothing timed or compared): one
broke silently when a library argument it passed was removed."""

import os
import subprocess
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


class BenchScriptsTest(absltest.TestCase):
    def test_input_pipeline_prints_its_line(self):
        result = run_bench("bench/input_pipeline.py", "--images=2", "--epochs=1", "--repeats=1")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("accurate/fast DCT", result.stdout)
        self.assertIn("python bench/input_pipeline.py --images=2", result.stdout)

    def test_train_step_prints_its_line(self):
        result = run_bench(
            "bench/train_step.py", "--config=experiments/demo.py", "--batch=8",
            "--image_size=32", "--steps=2", "--warmup=1", "--vs_default",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("python bench/train_step.py", result.stdout)
        self.assertIn("speedup_vs_default=", result.stdout)  # XLA's defaults, not --xla_option


if __name__ == "__main__":
    absltest.main()
