"""Weights in and out: published weights, torchvision / Keras / timm import, export."""
