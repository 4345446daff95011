"""Weights in and out: the published ImageNet files (``pretrained``: addresses, hashes, a cached
resumable download), torchvision and timm ``.pth`` (``torchvision``, no PyTorch needed), Keras
``.h5`` (``keras``), vgg_jax's own ``.npz``/``.safetensors`` (``export``), and ``importer``, which
turns any of them into a checkpoint that carries its input convention (``vgg_jax.conventions``)."""
