"""Every test process sees four CPU devices, so sharding code runs on a real multi-device mesh
(big_vision and the Flax examples test this way). Must run before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# absltest's helpers (create_tempdir and friends) read absl flags; pytest does not parse them.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
