"""What the processes of a multi-process job were each given, compared across them.

Every process computes its own learning rate, data order, augmentation and evaluation schedule
from its own config and its own copy of the data, and feeds them to collective computations:
nothing in JAX compares them. Processes given different values trained to the end with
"replicated" parameters that differed between their devices. These helpers gather one small JSON
value from every process (two small collectives) and name what differs from process 0's.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def device_count_problem(devices: Sequence[Any]) -> str | None:
    """Why a job whose processes hold different numbers of ``devices`` (every process sees the
    same global list) cannot run, or None. JAX's multi-host utilities, which every gather and
    barrier here uses, assume one count on every process: processes with 2 and 3 CPU devices
    ended in a traceback (``cannot reshape array of size 5 into shape (2,2)``) on one and an
    abort on the other, after start-up."""
    counts = collections.Counter(int(d.process_index) for d in devices)
    if len(set(counts.values())) <= 1:
        return None
    listed = ", ".join(f"process {p}: {counts[p]}" for p in sorted(counts))
    return (
        f"The processes of this job hold different numbers of devices ({listed}); every "
        "process needs the same number (set the same devices visible to each, e.g. the same "
        "XLA_FLAGS or CUDA_VISIBLE_DEVICES count)."
    )


def gather_json(value: Any) -> list[Any]:
    """``value`` (anything ``json.dumps`` takes) of every process, in process order; every
    process gets the same list. One process: ``[value]``, without a collective."""
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    mine = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(mine.size)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: mine.size] = mine
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [
        json.loads(row[:length].tobytes().decode())
        for row, length in zip(gathered, lengths, strict=True)
    ]


def differences(processes: list[dict[str, str]]) -> list[str]:
    """One line per process whose ``{name: text}`` differs from process 0's, naming each name
    with process 0's text and its own."""
    lines = []
    for index, settings in enumerate(processes[1:], start=1):
        keys = sorted(processes[0].keys() | settings.keys())
        changed = [
            f"{k} {processes[0].get(k, '(none)')} -> {settings.get(k, '(none)')}"
            for k in keys
            if processes[0].get(k) != settings.get(k)
        ]
        if changed:
            lines.append(f"process {index}: {'; '.join(changed)}")
    return lines


def agreed(
    what: str, action: Callable[[], Any], failure: Callable[[str], Exception] | None = None
) -> Any:
    """``action()`` on every process, then one small collective that says whether it raised on
    any of them: then every process raises, the failed ones their own error and the others a
    ``failure(text)`` (an exception class or a function making one; default ``DatasetError``)
    naming each failed process and its error. One process: ``action()``.

    A process whose copy of the data was not prepared (or could not be) stopped with its one
    line, while the others waited in the next collective for it until JAX's coordination
    service aborted them all 5 minutes later (exit 134, a page of gRPC errors and no word of
    the cause on process 0)."""
    import jax

    if jax.process_count() == 1:
        return action()
    result, error = None, None
    try:
        result = action()
    except BaseException as e:  # noqa: BLE001 - raised again below, once every process knows
        # BaseException too: a Ctrl-C or a SystemExit on one process left the others waiting.
        error = e
    problem = None if error is None else type(error).__name__ + (f": {error}" if str(error) else "")
    problems = gather_json(problem)
    if error is not None:
        raise error
    if failed := [(index, problem) for index, problem in enumerate(problems) if problem]:
        if failure is None:
            from vgg_jax import data

            failure = data.DatasetError
        raise failure(
            f"{what} failed on another process of this job: "
            + "; ".join(f"process {index}: {problem}" for index, problem in failed)
        )
    return result


def check_same_data(config: Any) -> None:
    """Raises ``DatasetError`` on every process when the processes' copies of the prepared
    dataset differ (``data.data_fingerprint``: hosts may each hold their own ``data_dir``).

    A host whose copy had one image more (or one that did not decode) computed another training
    order of another length and took its share of each batch from it: examples were skipped or
    seen twice within an epoch, and the run ended with exit status 0."""
    import jax

    if jax.process_count() == 1:
        return
    from vgg_jax import data

    found = agreed("Reading the prepared dataset", lambda: data.data_fingerprint(config))
    if lines := differences(gather_json(found)):
        raise data.DatasetError(
            "The processes' copies of the dataset differ (each compared with process 0's; "
            "prepare every host's data from the same files; a copy whose records differ only "
            "in order or image size: delete it and prepare it again):\n  " + "\n  ".join(lines)
        )
