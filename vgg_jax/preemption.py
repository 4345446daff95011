"""Stopping cleanly on SIGTERM, the notice cloud schedulers and TPU pods give before preemption.

One process: a Python handler notes the signal and the training loop saves and exits at the next
step boundary. Ctrl-C (SIGINT) does the same there, and a second Ctrl-C stops at once: a laptop's
or a notebook's interrupt used to raise ``KeyboardInterrupt`` mid-step and lose every step since
the last periodic checkpoint (2,000 steps apart in the paper's configs).

Several processes (``jax.distributed``): the signal often reaches one host first, and a process
that stops alone leaves the others waiting in the next collective. So no Python handler is
installed there: ``jax.distributed.initialize`` installs the runtime's own SIGTERM notifier, which
tells the coordination service; every process then agrees on one sync point (the fastest process's
check count + 1) and ``multihost_utils.reached_preemption_sync_point`` returns True at that same
check on every process. A Python ``signal.signal(SIGTERM, ...)`` would replace the runtime's
handler and the sync point would never come. Every process must therefore call ``agreed_stop``
at the same places equally often: once per training step, per evaluation batch, per poll of
continuous evaluation. The call is a local lookup (no communication), about a microsecond.
"""

from __future__ import annotations

import signal

import jax
from absl import logging


class Stopped(Exception):
    """Raised inside evaluation when every process agreed to stop after a SIGTERM."""


_checks = 0  # agreed_stop calls so far in this process: the sync protocol's counter
_stopped = False


def stopped() -> bool:
    """Whether a termination signal has stopped this run (then nothing new should start)."""
    return _stopped


def agreed_stop() -> bool:
    """On several processes: True at the same call on every process once any of them got a
    SIGTERM, and on every call after that. Always False on one process (its signal is handled by
    ``StopSignal`` in training and ends evaluation outright, with nothing waiting on it)."""
    global _checks, _stopped
    if jax.process_count() == 1 or not jax.config.jax_enable_preemption_service:
        return False
    if _stopped:
        return True
    from jax.experimental import multihost_utils

    # Counted from 1 in this process: a signal that came before the first check (while compiling
    # or restoring) gives the sync point 1, so every process stops at its first check.
    _checks += 1
    if multihost_utils.reached_preemption_sync_point(_checks):
        logging.warning("SIGTERM: every process agreed to stop (check %d).", _checks)
        _stopped = True
    return _stopped


class StopSignal:
    """The training loop's stop flag: ``requested()`` once per step, ``restore()`` at the end."""

    def __init__(self):
        self._received = False
        self._installed = jax.process_count() == 1
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._previous_interrupt = signal.signal(signal.SIGINT, self._handle_interrupt)
        elif not jax.config.jax_enable_preemption_service:
            logging.warning(
                "jax_enable_preemption_service is off: a SIGTERM will not stop the processes "
                "together, so no checkpoint is saved for it."
            )
        elif callable(signal.getsignal(signal.SIGTERM)):
            logging.warning(
                "A Python SIGTERM handler replaced JAX's preemption notifier: a SIGTERM will not "
                "stop the processes together."
            )

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self._received = True

    def _handle_interrupt(self, signum, frame):
        if self._received:  # the second Ctrl-C: the user will not wait for the save
            raise KeyboardInterrupt
        logging.warning(
            "Ctrl-C: saving a checkpoint after this step and stopping (Ctrl-C again stops at "
            "once, losing the steps since the last checkpoint)."
        )
        self._received = True

    def requested(self) -> bool:
        """Whether to save and stop after this step; the same answer at the same step on every
        process."""
        global _stopped
        if jax.process_count() > 1:
            return agreed_stop()
        _stopped = _stopped or self._received
        return self._received

    def restore(self) -> None:
        if self._installed:
            # None: the previous handler was not Python's (then the default is the closest).
            for signum, previous in (
                (signal.SIGTERM, self._previous),
                (signal.SIGINT, self._previous_interrupt),
            ):
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
