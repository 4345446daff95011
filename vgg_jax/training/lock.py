"""One trainer per workdir.

Two trainers on one workdir would overwrite each other's checkpoints and interleave
``metrics.jsonl``. The trainer holds an exclusive ``fcntl.flock`` on ``<workdir>/train.lock`` for
the whole run; a second trainer fails at once, naming the process that holds it (written into the
file). The kernel releases the lock when its process dies, however it dies, so a lock left by a
killed trainer never blocks a restart. In a multi-process job only process 0 locks: the job's
other processes share its workdir on purpose, and each checks that it does (it reads the holder
process 0 wrote): with a workdir on each host's own disk, the first checkpoint save hung.

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

from vgg_jax import writers

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
    """Another live trainer holds the workdir; the message names it."""


class WorkdirNotSharedError(RuntimeError):
    """A process of a multi-process job does not see the workdir process 0 writes."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``workdir``'s training lock for the ``with`` block (process 0 only).

    In a multi-process job every process learns whether process 0 got the lock and all of them
    raise ``WorkdirBusyError`` when it did not: before, process 0 alone stopped and the others
    waited for it in the first collective until JAX's 300 s shutdown barrier aborted both. Every
    other process then reads the holder line process 0 wrote and all raise
    ``WorkdirNotSharedError`` when one does not find it (``_not_shared``)."""
    path = os.path.join(workdir, LOCK_FILE)
    lock_file, busy, holder = None, None, None
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        try:
            lock_file = open(path, "a+")  # noqa: SIM115 (held open for the run: the lock lives with it)
        except OSError as e:
            raise writers.write_error(e, path) from e
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            other = lock_file.read().strip() or "another process"
            lock_file.close()
            lock_file = None
            busy = (
                f"Workdir {workdir} is in use by {other} (lock {path}); stop that trainer "
                "or train into another --workdir."
            )
        except OSError:  # a filesystem without locks: the OS's reason
            lock_file.close()
            raise
    try:
        if lock_file is not None:
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            holder = f"trainer pid {os.getpid()} on host {socket.gethostname()}, since {started}"
            try:  # unbuffered: a full disk fails here, not again when the file is closed
                os.ftruncate(lock_file.fileno(), 0)
                os.pwrite(lock_file.fileno(), holder.encode(), 0)
                os.fsync(lock_file.fileno())  # before the other processes look for it
            except OSError as e:
                raise writers.write_error(e, path) from e
        if jax.process_count() > 1:
            busy = _shared_verdict(workdir, path, busy, holder)
        if busy is not None:
            raise WorkdirBusyError(busy)
        if lock_file is None:  # another process of the job: process 0 holds the lock for it
            yield
            return
        try:
            yield
        finally:
            lock_file.truncate(0)  # a clean exit leaves no holder named
    finally:
        if lock_file is not None:
            lock_file.close()  # releases the lock


def _shared_verdict(workdir: str, path: str, busy: str | None, holder: str | None) -> str | None:
    """Process 0's ``busy`` message, the same on every process; raises
    ``WorkdirNotSharedError`` on every process when one of them cannot read ``holder`` (process
    0's line) in its own ``path``. Orbax writes each process's shards of a checkpoint into that
    process's workdir and reads them back from there: a job with a workdir on each host's own
    disk trained, then hung in its first save (each part in another directory, nothing
    committed) until every process aborted 10 minutes later. The same shared storage may be
    mounted at a different path on each host: what must agree is what they see."""
    from vgg_jax import processes

    busy, holder = processes.gather_json([busy, holder])[0]
    problem = None
    if busy is None and jax.process_index() != 0:
        problem = _not_shared(workdir, path, holder)
    problems = [p for p in processes.gather_json(problem) if p is not None]
    if problems:
        raise WorkdirNotSharedError(
            "The processes of this job must share one workdir (shared storage such as NFS, "
            "mounted at any path on each host); Orbax cannot save a checkpoint split between "
            "hosts:\n  " + "\n  ".join(problems)
        )
    return busy


def _not_shared(workdir: str, path: str, holder: str) -> str | None:
    """Why this process does not see process 0's ``holder`` line in ``path``, or None."""
    index = jax.process_index()
    try:
        with open(path) as f:
            seen = f.read().strip()
    except OSError as e:
        return (
            f"process {index} on host {socket.gethostname()}: --workdir={workdir} lacks "
            f"process 0's {LOCK_FILE} ({e.strerror})"
        )
    if seen != holder:
        return (
            f"process {index} on host {socket.gethostname()}: {path} names "
            f"{seen or 'no trainer'}, not process 0's {holder}"
        )
    return None
