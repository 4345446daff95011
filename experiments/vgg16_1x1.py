"""VGG configuration C: 16 weight layers with three 1x1 convs (Table 1), trained and tested as
in the paper.

    python launch.py --config=experiments/vgg16_1x1.py --workdir=workdirs/vgg16_1x1_s256 \
        --config.init_from.workdir=workdirs/vgg11_s256
    python launch.py --config=experiments/vgg16_1x1.py:jitter --workdir=workdirs/vgg16_1x1_jitter \
        --config.init_from.workdir=workdirs/vgg16_1x1_s384

The argument picks the training scale: s256 (default), s384 or jitter (S in [256, 512]); see
vgg_jax/configs/paper.py. At S = 256 the net starts from the trained net A's first four convs and
three FC layers (section 3.1; init_from.mode=shallow): train experiments/vgg11.py first.
Needs ImageNet: --config.input.manual_dir=DIR holding the two ILSVRC2012 tars.
"""

from vgg_jax.configs import paper


def get_config(arg=None):
    return paper.paper_config("C", arg)
