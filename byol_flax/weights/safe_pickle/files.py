"""Opening the pickle file: a regular file only, read once, with the sha256 of what was read.

Devices, FIFOs and directories are refused before they are opened and again on the descriptor
(opened non-blocking), so nothing waits on them.
"""

import hashlib
import os
import stat
from collections.abc import Mapping
from typing import Any, BinaryIO

from byol_flax.weights.safe_pickle.unpickler import SafeUnpickler
from byol_flax.weights.safe_pickle.values import Builder, PickleReadError, Token, shown

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"))


def _regular_file_problem(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a file")


class _HashingReader:
    """A file read once, front to back: every byte the reader takes goes into the sha256 too,
    so the digest is of exactly the bytes that were parsed."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self._digest = hashlib.sha256()
        self._count = 0

    def read(self, count: int) -> bytes:
        data = self._file.read(count)
        self._digest.update(data)
        self._count += len(data)
        return data

    def readline(self, limit: int) -> bytes:
        data = self._file.readline(limit)
        self._digest.update(data)
        self._count += len(data)
        return data

    def hexdigest(self, size: int) -> str:
        """The sha256 of the first ``size`` bytes, reading what the pickle left after STOP."""
        while self._count < size and self.read(min(size - self._count, 1 << 24)):
            pass
        return self._digest.hexdigest()


def read_pickle_file(path: str | os.PathLike, *,
                     allowed: Mapping[tuple[str, str], Builder | Token]) -> tuple[Any, str]:
    """The pickle in the regular file ``path`` read with :class:`SafeUnpickler`, and the
    sha256 of the file's bytes (read once, to its size when opened). Devices, FIFOs and
    directories are refused before they are opened, and again on the descriptor (opened
    non-blocking), so nothing waits on them."""
    source = shown(os.fspath(path))
    try:
        kind = _regular_file_problem(os.stat(path).st_mode)
    except OSError as error:
        raise PickleReadError(f"{source}: cannot read the file: {error.strerror}") from None
    if kind is not None:
        raise PickleReadError(f"{source}: is {kind}, not a regular file: give the checkpoint "
                              "file itself")
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                             | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise PickleReadError(f"{source}: cannot open the file: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        kind = _regular_file_problem(info.st_mode)
        if kind is not None:  # replaced between the two looks
            raise PickleReadError(f"{source}: is {kind}, not a regular file")
        if info.st_size == 0:
            raise PickleReadError(f"{source}: not a readable pickle: the file is empty")
        reader = _HashingReader(file)
        content = SafeUnpickler(reader, source=source, allowed=allowed,
                                size=info.st_size).load()
        return content, reader.hexdigest(info.st_size)
