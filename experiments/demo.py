"""A small VGG (configuration A's layout at 1/8 width) on the built-in dataset, on a laptop CPU.

    python launch.py --config=experiments/demo.py --workdir=workdirs/demo

Generates the built-in dataset (no download), trains with the paper's recipe scaled down (SGD,
momentum 0.9, weight decay 5e-4, dropout 0.5, plateau learning-rate rule, scale jittering, flips,
PCA colour shift), then evaluates with dense, multi-crop and multi-scale testing and prints
top-1/top-5 error. Takes under 10 minutes on 2 CPU cores; see README for the figures.
"""

from experiments import common
from vgg_jax.data import settings


def get_config(arg=None):
    config = common.paper_config("A", "jitter")
    config.variant = "demo"
    config.model.num_classes = 10
    config.model.width = 1 / 8
    config.model.fc_width = 128
    config.model.init = "glorot"
    demo_values = settings.demo_input_config()  # crop 32, S in [32, 64], Q in {32, 48, 64}
    config.input.update(demo_values["input"])
    config.evals.update(demo_values["evals"])
    config.input.data_dir = "workdirs/data"
    config.input.batch_size = 64
    config.input.eval_batch_size = 128
    config.optim.learning_rate = 0.02
    config.init_from.mode = "none"
    config.schedule.num_epochs = 12
    config.schedule.plateau_patience = 1
    config.ckpt.every_steps = 200
    config.log_every_steps = 20
    return config
