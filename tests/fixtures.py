"""Shared test fixtures: one tiny config and one generated built-in dataset per test run.

Generating and indexing the built-in "tiny" dataset (100 training, 40 validation images) takes
several seconds; every test that reads it shares the one copy ``builtin_data_dir()`` makes, in
this process and in the subprocesses it starts (they get its path as ``input.data_dir``). Tests
never modify it: a test that needs a damaged dataset makes its own.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

import ml_collections

from vgg_jax.configs import paper

CROP = 32  # the smallest crop the five 2x2 pools allow


def set_values(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Applies ``{"group.key": value}`` overrides, as ``--config.group.key=value`` would."""
    for key, value in values.items():
        *groups, name = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        if name not in node:
            raise KeyError(f"No config key {key!r}")
        node[name] = value


def tiny_config(net: str = "A", with_data: bool = True, **values: Any) -> ml_collections.ConfigDict:
    """Net ``net`` at 1/16 width (FC 16) on 32-pixel crops of the tiny built-in dataset, with the
    demo's scales (S in [32, 64], Q in {32, 48}); ``values`` are ``"group.key"`` overrides.
    ``with_data=False`` leaves ``input.data_dir`` unset, for tests that feed their own batches."""
    config = paper.paper_config(net, "jitter")
    config.model.update(dict(num_classes=10, width=1 / 16, fc_width=16, init="glorot"))
    config.input.update(
        dict(
            dataset="builtin",
            builtin_size="tiny",
            data_dir=builtin_data_dir() if with_data else None,
            crop_size=CROP,
            train_scale_min=32,
            train_scale_max=64,
            batch_size=16,
            eval_batch_size=16,
            eval_bucket_step=16,
        )
    )
    config.evals.update(dict(single_scale=48, multi_scales=(32, 48)))
    config.init_from.mode = "none"  # the jitter variant fine-tunes from a run; tests start fresh
    set_values(config, values)
    return config


@functools.cache
def builtin_data_dir() -> str:
    """A TFDS data_dir holding the tiny built-in dataset, prepared (files, index, statistics)
    on first use in this process and removed when it exits."""
    from vgg_jax import data

    path = tempfile.mkdtemp(prefix="vgg_jax_tiny_builtin_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    config = paper.paper_config("A", "jitter")
    config.input.update(dict(dataset="builtin", builtin_size="tiny", data_dir=path))
    data.prepare(config)
    return path


def free_port() -> int:
    """A localhost port nobody listens on, for a JAX coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def host_devices_env(count: int) -> dict[str, str]:
    """This process's environment for a subprocess that sees ``count`` CPU devices: the test
    session's other XLA flags (``conftest.py``) stay."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={count}")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python launch.py *args`` from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """``(returncode, stdout, stderr)`` of a started process, killed if it outlives ``timeout``
    (a regression fails in bounded time instead of hanging in a collective)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return process.returncode, stdout or "", stderr or ""
