"""The paper's experiments in miniature: Tables 3-6, the 5x5 comparison and section 3.1's inits.

    python launch.py --config=experiments/study.py --workdir=workdirs/study --mode=study
    python launch.py --config=experiments/study.py:quick --workdir=workdirs/study_quick --mode=study

Trains nets A, A-LRN, B, B-5x5, C, D, E at 1/8 width on 32-pixel crops of the built-in dataset
at a small fixed S, a large fixed S (fine-tuned from the small-S net) and jittered S (fine-tuned
from the large-S net), three seeds each, with the paper's protocol (momentum SGD 0.9, L2 5e-4,
the plateau rule, B-E initialised from the trained A) but He's init on unit-range inputs and no
dropout, without which net A stays at chance at this size (docs/study.md); plus section 3.1's arms
(the deepest net from random N(0, 0.01^2) and from Glorot's init; Adam for A as an optional arm).
Then evaluates every run with dense, multi-crop and multi-scale testing, fuses D and E, and writes
study.md / study.json / PNG plots with one verdict per finding (docs/study.md).

Rerun the same command at any time: finished runs are skipped, an interrupted run resumes from
its checkpoint. Everything below is plain config: add a net or a seed with e.g.
``--config.seeds=(0,1,2,3)``; run on your own images with ``--config.base.input.dataset=image_folder
--config.base.input.folder=DIR --config.base.model.num_classes=K``.
Argument: full (default), quick (<= 10 minutes) or smoke (the test suite's tiny version).
"""

import ml_collections

from vgg_jax.configs import demo, paper

SIZES = ("full", "quick", "smoke")


def base_config() -> ml_collections.ConfigDict:
    """One run's training config: the paper's protocol at 1/8 width on 32-pixel crops."""
    config = paper.paper_config("A", "s256")
    config.model.num_classes = 10
    # 1/8 width, as the demo: at 1/16 (4 channels in block 1) no recipe tried left chance in 8
    # epochs (docs/study.md).
    config.model.width = 1 / 8
    config.model.fc_width = 512  # 4096 / 8
    # Changes to the paper's recipe (docs/study.md, "Why not the paper's init"): at this width
    # N(0, 0.01^2) shrinks the signal 8-16x more per layer than at full width, and no variant of
    # the paper's recipe left chance in 6-8 epochs here; so every net trained from scratch uses
    # He's init on inputs scaled to about unit range (and no dropout, below). SGD, L2 and the
    # plateau rule stay the paper's.
    config.model.init = "he"
    config.input.pixel_std = (60.0, 60.0, 60.0)
    # With dropout 0.5 net A stayed at chance for 8 epochs here (and the plateau rule then cut
    # the rate); without it, the paper's SGD leaves chance within a few epochs (docs/study.md).
    config.model.dropout_rate = 0.0
    demo_values = demo.demo_input_config()
    config.input.update(demo_values["input"])
    # The demo's evaluation at this size (vgg_jax/configs/demo.py): a 3x3 crop grid x 2 flips per
    # Q (on images barely larger than the crop the paper's 5x5 grid repeats near-copies) and
    # 16-pixel validation buckets. The plan sets the test scales.
    for key in ("multi_crop_grid", "validation_bucket_step"):
        config.evals[key] = demo_values["evals"][key]
    config.input.data_dir = "workdirs/data"
    # Smaller than the paper's 256: a run has only a few epochs, and leaving chance takes steps.
    config.input.batch_size = 32
    config.input.eval_batch_size = 256  # a multiple of any power-of-two device count
    # The paper's rule; 3 epochs rather than 2 so that validation noise on 1,000 images at
    # chance does not cut the rate before a net has left chance (docs/training.md).
    config.schedule.plateau_patience = 3
    config.init_from.mode = "none"
    config.ckpt.every_steps = 100
    config.ckpt.keep = 1
    config.ckpt.keep_best = False
    config.log_every_steps = 1000
    return config


def scale_setting(
    train_scale,
    single_scale,
    multi_scales,
    paper,
    num_epochs,
    learning_rate,
    fine_tune_from=None,
    methods=("dense",),
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            train_scale=train_scale,  # (S_min, S_max)
            single_scale=single_scale,  # Q of Table 3
            multi_scales=multi_scales,  # Q set of Table 4
            paper=paper,  # the paper's column it stands for: 256, 384 or jitter
            num_epochs=float(num_epochs),  # a float: the command line takes 0.5 too
            learning_rate=learning_rate,
            fine_tune_from=ml_collections.FieldReference(fine_tune_from, field_type=str),
            methods=methods,
        )
    )


def get_config(arg=None):
    size = arg or "full"
    if size not in SIZES:
        raise ValueError(f"Unknown config argument {size!r}; valid: {list(SIZES)}")
    config = ml_collections.ConfigDict()
    config.size = size
    config.base = base_config()
    config.nets = ("A", "A-LRN", "B", "B-5x5", "C", "D", "E")
    config.seeds = (0, 1, 2)
    # The paper's 224-pixel crops at S = 256, 384 and [256; 512] scaled by 32/224 (1/7).
    all_methods = ("dense", "multi_crop", "dense+multi_crop")
    config.scales = ("small", "large", "jitter")
    config.scale_settings = ml_collections.ConfigDict(
        dict(
            small=scale_setting((36, 36), 36, (32, 36, 40), "256", 8, 1e-2),
            large=scale_setting((56, 56), 56, (52, 56, 60), "384", 2, 1e-3, "small"),
            jitter=scale_setting(
                (36, 72), 56, (36, 56, 72), "jitter", 2, 1e-3, "large", all_methods
            ),
        )
    )
    # Section 3.1: A (and A-LRN) from random init, B-E from the trained A's first four convs and
    # three FC layers; B-5x5's 5x5 convs cannot take A's 3x3 ones, so it gets A's FC layers.
    config.init_from_a = ml_collections.ConfigDict(
        {"B": "shallow", "C": "shallow", "D": "shallow", "E": "shallow", "B-5x5": "fc"}
    )
    config.arms = ("random", "glorot")  # add "adam" for the extra Adam arm
    config.arm_settings = ml_collections.ConfigDict(
        dict(
            # The paper's normal init from scratch (its "variance 10^-2" read as std 0.01, as in
            # Caffe's fillers: models.kernel_initializer), and Glorot's init (section 3.1).
            random=dict(
                nets=("E",), scales=("small",), overrides=dict(model=dict(init="paper_normal"))
            ),
            glorot=dict(nets=("E",), scales=("small",), overrides=dict(model=dict(init="glorot"))),
            adam=dict(
                nets=("A",),
                scales=("small",),
                overrides=dict(optim=dict(name="adam", learning_rate=1e-3)),
            ),
        )
    )
    config.fusion = (("D", "E"),)
    config.fusion_scale = "jitter"
    config.findings = ml_collections.ConfigDict(dict(fixed_scale="large", jitter_scale="jitter"))
    if size == "quick":
        config.seeds = (0, 1)
        config.nets = ("A", "B", "D")
        config.base.input.builtin_size = "small"
        for name, epochs in (("small", 4), ("large", 1), ("jitter", 1)):
            config.scale_settings[name].num_epochs = epochs
        config.arms = ("glorot",)
        config.arm_settings.glorot.nets = ("D",)
        config.fusion = (("B", "D"),)
    if size == "smoke":
        config.seeds = (0,)
        config.nets = ("A", "B")
        config.base.input.builtin_size = "tiny"
        config.base.model.width = 1 / 32
        config.base.model.fc_width = 8
        config.base.input.batch_size = 20
        config.base.input.eval_batch_size = 40
        for name in ("small", "large", "jitter"):
            config.scale_settings[name].num_epochs = 1
        config.arms = ("glorot",)
        config.arm_settings.glorot.nets = ("B",)
        config.fusion = (("A", "B"),)
    return config
