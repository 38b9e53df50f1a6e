"""Files written a line at a time (the log, ``metrics.jsonl``, TensorBoard events), locally
and on ``gs://``, read back as one history.

A local file is appended to and flushed at every write. A Cloud Storage object cannot be
appended to, so on ``gs://`` what is written is buffered and uploaded as a new object, a
*segment* named ``<path>.<sequence>-<token>`` (the sequence is the upload's time in
nanoseconds, so segments sort in time order across writers and restarts without listing what
is there), at most :data:`SEGMENT_SECONDS` after it was written (a timer uploads it even when
nothing else is written) and when the log is closed.
A preempted or killed VM therefore loses at most the last :data:`SEGMENT_SECONDS` of lines;
nothing of the run's history stays on the VM's disk.

:func:`read_log` returns ``<path>`` (if it exists) followed by its segments in sequence order,
so every reader (report, model card, resume checks) sees one history. :func:`rewrite_log`
replaces the whole history (a resume drops the lines of steps it will redo): locally by an
atomic rename; on ``gs://`` by a *base* segment (``...-<token>.base``) after which a reader
ignores everything older, and only then are the older objects deleted, so a kill in between
leaves a history that still reads correctly. A single writer (``metrics.jsonl``: process 0)
compacts its segments into a base the same way when it has uploaded :data:`MAX_SEGMENTS` of
them, so the number of objects stays bounded over a long run. The log (one writer per process)
and TensorBoard event files (each segment an event file of its own, named so that TensorBoard
reads them in order) are not compacted: at most one object per :data:`SEGMENT_SECONDS` each.
"""

import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import IO

from etils import epath

from byol_flax.storage import files

# At most this many seconds of lines are lost when a VM is preempted (gs:// only).
SEGMENT_SECONDS = 30.0
# Segments a writer uploads before it compacts them into one base segment.
MAX_SEGMENTS = 256
_SEGMENT = re.compile(r"\.(\d{20})-([0-9a-f]{8})(\.base)?$")


def _segments(path: epath.PathLike) -> list[tuple[int, str, bool, epath.Path]]:
    """The segments of ``path``: (sequence, token, is_base, path), in order."""
    path = epath.Path(path)
    if not path.parent.exists():
        return []
    found = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        match = _SEGMENT.fullmatch(candidate.name[len(path.name):])
        if match:
            found.append((int(match[1]), match[2], bool(match[3]), candidate))
    return sorted(found, key=lambda segment: segment[:2])


def _live(segments: list) -> list:
    """The segments a reader uses: from the newest base on (all of them without one)."""
    bases = [index for index, segment in enumerate(segments) if segment[2]]
    return segments[bases[-1]:] if bases else segments


def read_log_bytes(path: epath.PathLike, *, what: str = "log",
                   max_bytes: int = files.DEFAULT_MAX_BYTES) -> bytes:
    """The whole history of ``path``: the file itself, then its segments (b"" when neither
    exists). Bounded by ``max_bytes`` in all."""
    segments = _segments(path) if files.is_remote(path) else []
    live = _live(segments)
    parts = [] if (live and live[0][2]) or not files.exists(path) else [
        files.read_bytes(path, what=what, max_bytes=max_bytes)]
    for *_, segment in live:
        parts.append(files.read_bytes(segment, what=what, max_bytes=max_bytes))
        if sum(map(len, parts)) > max_bytes:
            raise files.StorageError(f"{what} {os.fspath(path)} is larger than "
                                     f"{max_bytes:,} bytes in all: not reading it")
    return b"".join(parts)


def read_log(path: epath.PathLike, *, what: str = "log",
             max_bytes: int = files.DEFAULT_MAX_BYTES) -> str:
    """:func:`read_log_bytes` as text."""
    return read_log_bytes(path, what=what, max_bytes=max_bytes).decode("utf-8", "replace")


def log_exists(path: epath.PathLike) -> bool:
    """Whether ``path`` or any segment of it exists."""
    return files.exists(path) or (files.is_remote(path) and bool(_segments(path)))


def _new_segment(path: epath.PathLike, sequence: int, *, base: bool = False) -> epath.Path:
    suffix = f".{sequence:020d}-{secrets.token_hex(4)}" + (".base" if base else "")
    return epath.Path(path).parent / (epath.Path(path).name + suffix)


def rewrite_log(path: epath.PathLike, data: bytes | str, *, what: str = "log") -> None:
    """Replaces the whole history of ``path`` by ``data``, atomically for a reader."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if not files.is_remote(path):
        files.write_bytes(path, data, what=what)
        return
    older = _segments(path)
    files.write_bytes(_new_segment(path, max([time.time_ns()] + [s[0] + 1 for s in older]),
                                   base=True), data, what=what)
    for *_, segment in older:  # a reader already ignores them
        segment.unlink(missing_ok=True)
    if files.exists(path):
        epath.Path(path).unlink(missing_ok=True)


class SegmentWriter:
    """Appends to ``path`` on ``gs://`` as segments (see the module docstring). ``write``
    takes text or bytes; ``flush`` uploads only when the oldest pending byte is
    ``segment_seconds`` old (a timer thread does it otherwise); ``close`` uploads the rest.
    ``guard`` runs before every upload (the workdir lease's fence). ``compact``: merge into a
    base segment after :data:`MAX_SEGMENTS` uploads: only for a log with one writer (a base
    hides every older segment, another writer's too), never for TensorBoard event files (whose
    reader reads every segment as a file of its own)."""

    def __init__(self, path: epath.PathLike, *, what: str = "log",
                 segment_seconds: float = SEGMENT_SECONDS, compact: bool = True,
                 guard: Callable[[], None] | None = None):
        self.path = epath.Path(path)
        self.what = what
        self.segment_seconds = segment_seconds
        self.compact = compact
        self.guard = guard
        self._last = 0  # the sequence of this writer's last segment
        self._uploaded = 0
        self._pending: list[bytes] = []
        self._pending_since: float | None = None
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.closed = False

    def __enter__(self) -> "SegmentWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, data: bytes | str) -> int:
        encoded = data.encode("utf-8") if isinstance(data, str) else data
        with self._lock:
            if self.closed:
                raise ValueError(f"{self.what} {self.path} is closed")
            self._pending.append(encoded)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
                self._timer = threading.Timer(self.segment_seconds, self._upload_from_timer)
                self._timer.daemon = True
                self._timer.start()
        return len(data)

    def flush(self) -> None:
        with self._lock:
            if (self._pending_since is not None
                    and time.monotonic() - self._pending_since >= self.segment_seconds):
                self._upload()

    def upload(self) -> None:
        """Uploads what is pending now, whatever its age."""
        with self._lock:
            self._upload()

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self._upload()
                self.closed = True

    def _upload_from_timer(self) -> None:
        try:
            self.upload()
        except BaseException:  # noqa: BLE001  (a timer thread has no caller: the next write's upload or close reports it)
            return

    def _upload(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        if self.guard is not None:
            self.guard()
        data = b"".join(self._pending)
        self._last = max(time.time_ns(), self._last + 1)
        files.write_bytes(_new_segment(self.path, self._last), data, what=self.what)
        self._pending, self._pending_since = [], None
        self._uploaded += 1
        if self.compact and self._uploaded >= MAX_SEGMENTS:
            rewrite_log(self.path, read_log_bytes(self.path, what=self.what,
                                                  max_bytes=1 << 40), what=self.what)
            self._uploaded = 0


def open_log(path: epath.PathLike, *, what: str = "log", binary: bool = False,
             truncate: bool = False, compact: bool = True,
             segment_seconds: float = SEGMENT_SECONDS,
             guard: Callable[[], None] | None = None) -> IO | SegmentWriter:
    """A writable object for the log at ``path``: the local file opened for appending (a link
    or non-regular file refused), or a :class:`SegmentWriter` on ``gs://``. ``truncate``:
    the history starts empty."""
    if not files.is_remote(path):
        return files.open_append(path, truncate=truncate, binary=binary, what=what)
    if truncate and log_exists(path):
        rewrite_log(path, b"", what=what)
    return SegmentWriter(path, what=what, compact=compact, segment_seconds=segment_seconds,
                         guard=guard)
