"""Shared defaults for every experiment: the paper's protocol (the paper, sections 3.1 and 3.2).

Each paper-net config (``vgg11.py`` ... ``vgg19.py``) calls ``paper_config(net, arg)``; the demo
shrinks the same config. Values only: the code that reads them validates names at start-up.
"""

from __future__ import annotations

import ml_collections

# Training scale S and the test scales Q that go with it (sections 3.1, 4.1, 4.2).
# s256/s384: fixed S, single test scale Q = S, multi-scale Q = {S-32, S, S+32}.
# jitter: S uniform in [256, 512], single test scale Q = 384, multi-scale Q = {256, 384, 512}.
SCALE_VARIANTS = {
    "s256": dict(train_scale=(256, 256), single_scale=256, multi_scales=(224, 256, 288)),
    "s384": dict(train_scale=(384, 384), single_scale=384, multi_scales=(352, 384, 416)),
    "jitter": dict(train_scale=(256, 512), single_scale=384, multi_scales=(256, 384, 512)),
}
# How each variant is initialised in the paper: the S=384 net from the S=256 net with lr 1e-3,
# the jittered net fine-tuned from the S=384 net (also at lr 1e-3, as a fine-tune).
FINE_TUNE_FROM = {"s384": "s256", "jitter": "s384"}
# How each net starts at S = 256 (section 3.1): A and A-LRN from random init, the deeper nets
# from the trained net A's first four convs and three FC layers (B-5x5's 5x5 convs cannot take
# A's 3x3 ones: its FC layers only). Set init_from.workdir to net A's run, or init_from.mode to
# "none" with model.init="glorot" (the paper's note: Glorot's init needs no pre-training).
INIT_FROM_A = {"B": "shallow", "C": "shallow", "D": "shallow", "E": "shallow", "B-5x5": "fc"}


# Keys added since runs began recording their config (a checkpoint's meta, a study's finished
# runs), each with the value that does what runs recorded without it did: a record that lacks
# one is compared as if it held that value, so an old run is not taken for a changed one.
ADDED_KEYS = {"input.eval_max_batch_pixels": 0}


def recorded_value(recorded: dict, key: str):
    """``recorded[key]`` of a flat recorded config, or the added key's old-behaviour value."""
    return recorded.get(key, ADDED_KEYS.get(key))


def model_config(net: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name=net,  # A, A-LRN, B, C, D, E (Table 1)
            num_classes=1000,
            width=1.0,  # multiplies every conv's channel count (small variants only)
            fc_width=4096,
            dropout_rate=0.5,
            dtype="float32",  # compute dtype: float32 or bfloat16; parameters stay float32
            init="paper_normal",  # paper_normal (N(0, init_std^2), zero biases), glorot or he
            init_std=0.01,
        )
    )


def input_config(scale: dict) -> ml_collections.ConfigDict:
    smin, smax = scale["train_scale"]
    return ml_collections.ConfigDict(
        dict(
            dataset="imagenet2012",  # imagenet2012, image_folder or builtin
            data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data_dir
            manual_dir=ml_collections.FieldReference(None, field_type=str),  # ILSVRC2012 tars
            folder=ml_collections.FieldReference(None, field_type=str),  # root/<split>/<class>/
            # Where the project's index and statistics go; None: next to the TFDS files. Set it
            # when data_dir is read-only (a shared copy); files go to index_dir/<name>/<version>.
            index_dir=ml_collections.FieldReference(None, field_type=str),
            # What preparation must have built, else it is moved aside and named as bad:
            # "published" (imagenet2012: 1,281,167 train / 50,000 validation, 1,000 classes;
            # other sources: every labelled class has training examples), "none", or
            # "train=N,validation=N,classes=N" for a subset.
            expected_counts="published",
            builtin_size="full",  # built-in dataset: full (5000/1000), small or tiny
            builtin_seed=0,  # the built-in dataset is a pure function of this seed
            stats_source="auto",  # mean/PCA: auto (published for imagenet2012), computed, published
            stats_max_images=10000,  # training images sampled to compute mean RGB and PCA
            train_split="train",
            eval_split="validation",
            crop_size=224,
            train_scale_min=smin,  # S: smallest side before the random crop
            train_scale_max=smax,  # equal to train_scale_min for fixed-scale training
            # 0-255 pixels divided by this after the mean; None: 1 (the paper). Stored in each
            # checkpoint with the mean as the net's input convention, which evaluation uses; an
            # explicit value that differs from a net's stored one is an error there.
            pixel_std=ml_collections.FieldReference(None, field_type=tuple),
            color_shift_std=0.1,  # AlexNet's PCA lighting noise: alpha ~ N(0, std^2)
            random_flip=True,
            batch_size=256,  # global batch over all devices and processes
            eval_batch_size=64,  # global; the last batch is padded and masked
            eval_bucket_step=32,  # eval images padded to (Q, long side rounded up to this)
            # Padded pixels (rows x bucket height x width) a global eval batch may hold; a batch
            # of elongated images that would pad to more has fewer rows. 0: eval_batch_size
            # images of aspect 4 at Q (every batch of ImageNet or the demo is full).
            eval_max_batch_pixels=0,
            shuffle_seed=0,
            num_parallel_calls=-1,  # -1: tf.data AUTOTUNE
            prefetch=2,
            decoded_cache_mb=1024,  # training splits decoding to at most this are decoded once
        )
    )


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="sgd",  # sgd (the paper: momentum SGD) or adam (an option for small nets)
            learning_rate=1e-2,
            momentum=0.9,
            weight_decay=5e-4,  # L2, added to the gradient (not decoupled)
        )
    )


def schedule_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="plateau",  # plateau (the paper), cosine, or constant
            num_epochs=74.0,  # a float, so the command line takes 1.5 as well as 74
            # Validations (one every evals.every_epochs epochs) without a better top-1
            # before dividing the rate.
            plateau_patience=2,
            plateau_factor=0.1,
            plateau_max_decays=3,
            plateau_min_delta=0.0,  # improvement needed to count, in top-1 accuracy (0.002: 0.2 pt)
            warmup_epochs=0.0,
        )
    )


def eval_config(scale: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            single_scale=scale["single_scale"],  # Q for Table 3's single-scale rows
            multi_scales=scale["multi_scales"],  # Q set for Table 4/5's multi-scale rows
            methods=("dense", "multi_crop", "dense+multi_crop"),
            flip=True,  # average each image (and each crop) with its horizontal flip
            multi_crop_grid=5,  # crops per side at each Q: 5x5 grid x 2 flips = 50 (150 for 3 Q)
            every_epochs=1,  # validation during training
            validation_examples=0,  # ... on this many of eval_split, evenly spaced (0: all)
            # ... in buckets whose long side is rounded up to this (0: input.eval_bucket_step):
            # a validation repeats every few epochs, an evaluation runs once, so a finer step
            # (fewer padded pixels, more programs to compile) can pay off for validation only.
            validation_bucket_step=0,
            checkpoint="latest",  # latest, best, or a step number, for --mode=evaluate
            # A checkpoint of another net than model.* describes, or with another class count
            # than the dataset, is an error unless this is True (then the checkpoint's net is
            # scored as it is).
            accept_checkpoint_net=False,
            fusion_workdirs=(),  # other nets' workdirs whose softmax is averaged with this one
            # ("path" or "path@latest|best|<step>")
            poll_seconds=60,  # continuous evaluation: how often to look for a new checkpoint
            watch_timeout_seconds=3600,  # ... and when to stop after no new checkpoint appears
        )
    )


def paper_config(net: str, arg: str | None) -> ml_collections.ConfigDict:
    """The paper's full protocol for ``net``; ``arg`` picks the training scale variant."""
    variant = arg or "s256"
    if variant not in SCALE_VARIANTS:
        raise ValueError(f"Unknown config argument {variant!r}; valid: {sorted(SCALE_VARIANTS)}")
    scale = SCALE_VARIANTS[variant]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(net)
    config.input = input_config(scale)
    config.optim = optim_config()
    config.schedule = schedule_config()
    config.evals = eval_config(scale)
    config.init_from = ml_collections.ConfigDict(
        dict(
            workdir=ml_collections.FieldReference(None, field_type=str),
            # none, shallow (the paper's net-A init), fc, or full (scale fine-tune)
            mode=INIT_FROM_A.get(net, "none"),
            step=ml_collections.FieldReference(None, field_type=int),  # None: the newest
        )
    )
    if variant in FINE_TUNE_FROM:
        config.optim.learning_rate = 1e-3
        config.init_from.mode = "full"  # set init_from.workdir to the FINE_TUNE_FROM net's workdir
    config.ckpt = ml_collections.ConfigDict(dict(every_steps=2000, keep=3, keep_best=True))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1: all remaining devices
    config.log_every_steps = 100
    return config
