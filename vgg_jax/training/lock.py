"""One trainer per workdir.

Two trainers on one workdir would overwrite each other's checkpoints and interleave
``metrics.jsonl``. The trainer holds an exclusive ``fcntl.flock`` on ``<workdir>/train.lock`` for
the whole run; a second trainer fails at once, naming the process that holds it (written into the
file). The kernel releases the lock when its process dies, however it dies, so a lock left by a
killed trainer never blocks a restart. In a multi-process job only process 0 locks: the job's
other processes share its workdir on purpose.

``flock`` works on local filesystems and on NFS (Linux emulates it with NFS byte-range locks);
filesystems without locking fail with the OS's reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

import jax

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
    """Another live trainer holds the workdir; the message names it."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``workdir``'s training lock for the ``with`` block (process 0 only).

    In a multi-process job every process learns whether process 0 got the lock and all of them
    raise ``WorkdirBusyError`` when it did not: before, process 0 alone stopped and the others
    waited for it in the first collective until JAX's 300 s shutdown barrier aborted both."""
    path = os.path.join(workdir, LOCK_FILE)
    lock_file, busy = None, None
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        lock_file = open(path, "a+")  # noqa: SIM115 (held open for the run: the lock lives with it)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            lock_file = None
            busy = (
                f"Workdir {workdir} is in use by {holder} (lock {path}); stop that trainer "
                "or train into another --workdir."
            )
        except OSError:  # a filesystem without locks: the OS's reason
            lock_file.close()
            raise
    if jax.process_count() > 1:
        from vgg_jax import processes

        busy = processes.gather_json(busy)[0]
    if busy is not None:
        raise WorkdirBusyError(busy)
    if lock_file is None:  # another process of the job: process 0 holds the lock for it
        yield
        return
    try:
        lock_file.seek(0)
        lock_file.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        lock_file.write(
            f"trainer pid {os.getpid()} on host {socket.gethostname()}, since {started}"
        )
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.truncate(0)  # a clean exit leaves no holder named
    finally:
        lock_file.close()  # releases the lock
