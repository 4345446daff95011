"""The command lines, on top of everything else: ``cli`` (what ``launch.py`` runs) and the
``python -m vgg_jax.tools.<name>`` programs (``data``, ``import_weights``, ``export``,
``features``, ``pretrained``, ``predict``). Nothing in the library imports this package."""
