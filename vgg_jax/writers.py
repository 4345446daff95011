"""Where training figures go: TensorBoard event files, a JSON-lines log, and a console line.

Only process 0 writes. TensorBoard goes through ``tf.summary`` when TensorFlow is importable (it
is a project dependency, but the model and step run without it, e.g. on a GPU box with JAX only).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from typing import IO, Any

import jax
from absl import logging


def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``: the time left in progress lines (training, evaluation,
    downloads)."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# Where the storage, not the program, is at fault: said in one line, without a traceback.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class WriteError(OSError):
    """Writing one of a run's files failed (a full disk, a quota, a read-only place): one line
    naming the file and the OS's reason. An ``OSError`` raised by a flush or a close names no
    file, and TensorFlow's names it inside a multi-line status."""

    def __str__(self) -> str:
        number = f" [Errno {self.errno}]" if self.errno else ""
        return f"Could not write {self.filename}: {self.strerror}{number}"


def write_error(error: BaseException, path: str | os.PathLike) -> WriteError:
    """``error`` (an ``OSError``, or TensorFlow's status for an event file) as a ``WriteError``
    naming ``path``."""
    if isinstance(error, WriteError):
        return error
    number = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if number:
        return WriteError(number, error.strerror or os.strerror(number), os.fspath(path))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # TensorFlow's status: "{{function_node ...}} <file>; No space left on device\n..."
    text = lines[0].rsplit("; ", 1)[-1] if lines else type(error).__name__
    number = next((n for n in STORAGE_ERRNOS if os.strerror(n) == text), None)
    return WriteError(number, text, os.fspath(path))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is TerminateProcess there: no probe, kept as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def temporary_path(path: str | os.PathLike, suffix: str = "") -> str:
    """A temporary of this writer's own beside ``path``, ``<path>.<host>.<pid>.<random>.tmp``
    (and ``suffix``), to be renamed to ``path``. The temporaries a process of this host left
    when it was killed while writing one (its pid no longer runs) are removed first: nothing
    else would (each name is its writer's own), and a killed export leaves a whole net's size.
    Those of other hosts sharing the directory are left alone: their pids mean nothing here;
    on Windows all are (no pid is probed: ``os.kill`` there terminates the process)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    host = _host()
    own = re.compile(rf"{re.escape(name)}\.{re.escape(host)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    try:
        entries = os.listdir(directory or ".")
    except OSError:
        entries = []  # said by the write itself
    for entry in entries:
        if (
            entry.endswith(f".tmp{suffix}")
            and (match := own.fullmatch(entry[: len(entry) - len(suffix)]))
            and not _alive(int(match.group(1)))
        ):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, entry))
                logging.info("Removed %s, left by a writer killed while writing.", entry)
    return f"{path}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Writes to a temporary file beside ``path`` and renames it to ``path`` only on success, so
    a process killed while writing never leaves a truncated file under the real name (which
    readers, such as a restarted continuous evaluator, would take as written). A write that fails
    (a full disk, a read-only place) raises ``WriteError`` naming ``path``.

    The temporary's name is this writer's own (``temporary_path``): with one ``<path>.tmp`` for
    all, two writers of one file at once (two exports to one ``--out``, two evaluators of one
    workdir) wrote into one temporary, and the second rename failed or moved a mix of both."""
    tmp = temporary_path(path)
    try:
        try:
            with open(tmp, mode) as f:
                yield f
            os.replace(tmp, path)
        except OSError as e:
            raise write_error(e, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_together(texts: dict[str | os.PathLike, str]) -> None:
    """Writes files that belong together (an evaluation's ``results.md`` and ``results.json``:
    ``{path: text}``), each as ``atomic_open`` writes one; none is renamed until all are written,
    so a write that fails (a full disk) leaves the files there before, all of them, and raises
    ``WriteError`` naming its file. Renamed in order, the last one last, with its old self
    removed first: a kill between two renames leaves the earlier files without the last (which
    readers take as the mark of a whole set, as a continuous evaluation's ``step_N.json``), never
    beside an older last one. Written one at a time, a failure of the second left the first new
    beside the second old, or removed the first, leaving the second without it."""
    paths = list(texts)
    temporaries = [temporary_path(path) for path in paths]
    try:
        for path, tmp in zip(paths, temporaries, strict=True):
            try:
                with open(tmp, "w") as f:
                    f.write(texts[path])
            except OSError as e:
                raise write_error(e, path) from e
        with contextlib.suppress(FileNotFoundError):
            os.remove(paths[-1])
        for path, tmp in zip(paths, temporaries, strict=True):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(e, path) from e
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


def _is_tensorflow_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("tensorflow")


def _drop_torn_line(path: str) -> None:
    """Cuts a last line that does not end in a newline from the JSON-lines file ``path``: what a
    full disk left of a line (the kernel writes up to the last free block). Appended to, it was
    glued to the resumed run's first line, one line that no JSON reader parses (the study's
    report stopped there)."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:  # back from the end, a block at a time, to the last newline
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            if (newline := block.rfind(b"\n")) >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return
        f.truncate(end)
    logging.warning(
        "%s ended in a line cut short (%d bytes: a full disk or a kill while writing); removed it.",
        path,
        size - end,
    )


def _drop_lines_after(path: str, step: int) -> None:
    """Removes the lines of steps after ``step`` from the JSON-lines file ``path``: what a run
    logged after its last saved checkpoint, which the run resumed from ``step`` logs again (a
    failed save, a kill). Appended to, every such step had two lines (two values for one step
    in any plot). TensorBoard's event files are append-only and left as they are."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return

    def after(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            return False  # not a line of ours: left as it is

    kept = [line for line in lines if not after(line)]
    if len(kept) == len(lines):
        return
    with atomic_open(path) as f:
        f.writelines(kept)
    logging.info(
        "%s: removed %d lines of steps after %d, the step this run resumes from.",
        path,
        len(lines) - len(kept),
        step,
    )


class MetricWriter:
    """Scalars by step into ``<workdir>/metrics.jsonl`` and TensorBoard events. ``resume_step``:
    the step a training starts from (0 for a new one); lines of later steps, logged by a run
    that stopped after its last checkpoint, are removed, so each step has one line. ``None``
    (a continuous evaluation's, whose steps are checkpoints evaluated once) keeps every line."""

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        self._failed = False  # a write failed (``_writing``)
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._tb_dir = os.path.join(workdir, "tensorboard")
        with self._writing(self._jsonl_path):
            _drop_torn_line(self._jsonl_path)
            if resume_step is not None:
                _drop_lines_after(self._jsonl_path, resume_step)
            self._jsonl = open(self._jsonl_path, "a")  # noqa: SIM115
        try:
            import tensorflow as tf
        except ImportError:
            logging.warning("TensorFlow not importable: no TensorBoard events, metrics.jsonl only.")
        else:
            with self._writing(self._tb_dir):
                self._tb = tf.summary.create_file_writer(self._tb_dir)

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        """A failed write (a full disk: a flush, a close, TensorFlow's status) as a
        ``WriteError`` naming ``path``; after one, ``close`` closes without writing again."""
        try:
            yield
        except Exception as e:
            if not (isinstance(e, OSError) or _is_tensorflow_error(e)):
                raise
            self._failed = True
            raise write_error(e, path) from e

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        with self._writing(self._jsonl_path):
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            import tensorflow as tf

            with self._writing(self._tb_dir):
                with self._tb.as_default(step=step):
                    for name, value in values.items():
                        tf.summary.scalar(name, value)
                self._tb.flush()

    def close(self) -> None:
        try:
            if self._jsonl is not None:
                with self._closing(self._jsonl_path):
                    self._jsonl.close()
        finally:
            if self._tb is not None:
                with self._closing(self._tb_dir):
                    self._tb.close()

    def _closing(self, path: str) -> contextlib.AbstractContextManager:
        # After a failed write, closing flushes the same lost lines again: the first error,
        # already raised, is the one to report.
        if self._failed:
            return contextlib.suppress(Exception)
        return self._writing(path)
