"""The modes of ``launch.py --mode``, importable without JAX: the worker processes that draw the
built-in dataset are spawned, and a spawned worker imports ``launch.py`` again; with JAX, Orbax
and TensorFlow at its top, each worker spent 3-5 s importing them before drawing an image."""

MODES = ("train_and_evaluate", "train", "evaluate", "evaluate_continuously", "summary", "study")
