"""The project's nets in plain PyTorch, for the benches' side-by-side references (bench-only:
``bench/requirements.txt``); no flags here, so any bench can import it."""

from __future__ import annotations


def build_torch_net(config, image_size: int):
    """The same net in plain ``torch.nn`` from ``models.LAYOUTS`` (NCHW, float32) and the config's
    optimiser as the project applies it (L2 on weights only, then momentum SGD or Adam):
    ``(net, optimizer)``."""
    import torch
    from torch import nn

    from vgg_jax import models

    mc = config.model
    layers, channels = [], 3
    for block in models.LAYOUTS[mc.name]:
        for spec in block:
            if spec == models.LRN:
                layers.append(
                    nn.LocalResponseNorm(
                        models.LRN_SIZE, models.LRN_ALPHA, models.LRN_BETA, models.LRN_K
                    )
                )
                continue
            features, size = spec if isinstance(spec, tuple) else (spec, 3)
            features = max(1, round(features * mc.width))
            layers += [nn.Conv2d(channels, features, size, padding=size // 2), nn.ReLU()]
            channels = features
        layers.append(nn.MaxPool2d(2, 2))
    window = image_size // 2**models.NUM_POOLS
    layers += [
        nn.Flatten(),
        nn.Linear(window * window * channels, mc.fc_width),
        nn.ReLU(),
        nn.Dropout(mc.dropout_rate),
        nn.Linear(mc.fc_width, mc.fc_width),
        nn.ReLU(),
        nn.Dropout(mc.dropout_rate),
        nn.Linear(mc.fc_width, mc.num_classes),
    ]
    torch.manual_seed(config.seed)
    net = nn.Sequential(*layers).train()
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    groups = [
        {"params": weights, "weight_decay": config.optim.weight_decay},
        {"params": biases, "weight_decay": 0.0},
    ]
    if config.optim.get("name", "sgd") == "adam":
        opt = torch.optim.Adam(groups, lr=config.optim.learning_rate)
    else:
        opt = torch.optim.SGD(groups, lr=config.optim.learning_rate, momentum=config.optim.momentum)
    return net, opt
