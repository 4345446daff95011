"""Prepares a config's dataset and prints what the pipeline will read.

    python -m vgg_jax.tools.data --config=experiments/demo.py
    python -m vgg_jax.tools.data --config=experiments/vgg16.py --config.input.data_dir=~/tfds \
        --config.input.manual_dir=~/ilsvrc2012 --config.input.stats_source=computed

Generates / builds the TFDS files, indexes each split (sizes, formats, decode check) and computes
the training set's mean RGB and PCA eigen-pairs, skipping whatever is already done.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Only light imports here: a spawned worker that draws the built-in dataset imports this module
# again (JAX and Orbax come with vgg_jax.tools.cli, imported where it is used).
from vgg_jax import data
from vgg_jax.data import shapes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")


def main(argv: list[str]) -> None:
    from vgg_jax import writers
    from vgg_jax.tools import cli

    del argv
    cli.quiet_library_logs()
    config = _CONFIG.value
    start = time.perf_counter()
    try:
        data.prepare(config)
    except data.DatasetError as e:
        sys.exit(f"Data error: {e}")
    except writers.WriteError as e:  # a full disk or a read-only place, naming the file
        sys.exit(f"{type(e).__name__}: {e}")
    info = data.dataset_info(config)
    print(f"prepared {info.name} in {info.data_dir} ({time.perf_counter() - start:.1f} s)")
    print(f"classes {info.num_classes}, train {info.num_train}, eval {info.num_eval}")
    print(f"mean RGB {info.mean_rgb.round(3).tolist()}")
    print(f"PCA eigenvalues {info.pca_eigvals.round(5).tolist()}")
    print(f"PCA eigenvectors (columns) {info.pca_eigvecs.round(4).tolist()}")
    print(f"input counts {json.dumps(info.bad_input)}")


if __name__ == "__main__":
    from vgg_jax.tools import cli

    shapes.allow_worker_processes()  # guarded: a spawned worker may import this module again
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv or sys.argv))
