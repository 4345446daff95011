"""vgg_jax: the VGGNet paper's six nets, training and evaluation protocol in JAX/Flax."""
