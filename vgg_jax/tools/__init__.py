"""The ``python -m vgg_jax.tools.<name>`` command lines, on top of the library."""
