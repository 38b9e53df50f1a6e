"""Every file the project reads or writes, local or ``gs://``, through a few functions.

Safety is a property of this module, not of each caller's care:

- **Reads** accept regular files only. A FIFO, device, socket or directory is refused before it
  is opened (``stat`` follows a link to its target) and again on the opened descriptor (opened
  non-blocking, so a FIFO swapped in between cannot hang the process), and a file is read up to
  a size bound per kind of file: ``/dev/zero`` or a huge file never fills memory.
- **Writes** go to a new temporary file beside the target, created exclusively and never through
  a link (``O_CREAT | O_EXCL | O_NOFOLLOW``), flushed to disk, then renamed over the target: a
  reader sees the old file or the new one, never half of one. A link, FIFO, directory or
  other non-regular file at the target is refused in one line naming it, never followed or
  replaced. An existing file keeps its mode. :func:`write_files` checks every target of a
  multi-file update before renaming any, so an update happens whole or not at all.
- **Appends** (log files) refuse a link or non-regular file at the target.

``gs://`` paths (anything with ``://``) go through ``etils.epath``: an object has no links,
FIFOs or partial writes, so only the size bound applies. Errors are :class:`StorageError`, a
:class:`~byol_flax.errors.UserError` that the commands print as one line.
"""

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from typing import IO

from etils import epath

from byol_flax.errors import UserError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# Default bound of a whole-file read: far above any JSON or text file the project writes (an
# ImageNet manifest is ~200 KB), far below a host's memory.
DEFAULT_MAX_BYTES = 64 * MiB
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link"}


class StorageError(UserError, OSError):
    """A file that cannot be read or written safely; the message names it and says why."""

    def __str__(self) -> str:  # OSError's str() would print its args tuple
        return str(self.args[0]) if self.args else ""


def is_remote(path: epath.PathLike) -> bool:
    """Whether ``path`` is an object store URL (``gs://...``) rather than a local path."""
    return "://" in os.fspath(path)


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_regular(path: epath.PathLike, *, what: str = "file", follow_links: bool = True
                  ) -> os.stat_result | None:
    """The ``stat`` of the regular file ``path`` (following links unless ``follow_links`` is
    false, when a link is refused too), None when it does not exist; :class:`StorageError` when
    it is anything else. Never opens it."""
    if is_remote(path):
        return None
    try:
        info = (os.stat if follow_links else os.lstat)(os.fspath(path))
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"{what} {os.fspath(path)} is {_kind(info.st_mode)}, not a regular "
                           "file: not reading it")
    return info


def exists(path: epath.PathLike) -> bool:
    """Whether ``path`` names something (a dangling link counts: it is not ours to ignore)."""
    if is_remote(path):
        return epath.Path(path).exists()
    return os.path.lexists(os.fspath(path))


@contextlib.contextmanager
def open_regular(path: epath.PathLike, *, what: str = "file") -> Iterator[IO[bytes]]:
    """A binary file object of the regular file ``path``, checked before and after opening (a
    FIFO never blocks the open: it is opened non-blocking, then refused)."""
    if is_remote(path):
        with epath.Path(path).open("rb") as file:
            yield file
        return
    text = os.fspath(path)
    if check_regular(text, what=what) is None:
        raise FileNotFoundError(2, f"{what} {text} does not exist", text)
    descriptor = os.open(text, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{what} {text} is {_kind(info.st_mode)}, not a regular file: "
                               "not reading it")
        os.set_blocking(descriptor, True)
        file = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        yield file


def read_bytes(path: epath.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
               what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them (a larger file is
    refused naming its size: it is not the kind of file the caller expects)."""
    with open_regular(path, what=what) as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise StorageError(f"{what} {os.fspath(path)} is larger than {max_bytes:,} bytes, the "
                           "most such a file holds: not reading it")
    return data


def sha256(path: epath.PathLike, *, what: str = "file", chunk_bytes: int = 4 * MiB) -> str:
    """The sha256 of the regular file ``path``, read in chunks (any size: shards, features)."""
    digest = hashlib.sha256()
    with open_regular(path, what=what) as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_text(path: epath.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
              what: str = "file") -> str:
    """:func:`read_bytes` decoded as strict UTF-8 (undecodable bytes are refused naming the
    offset, never replaced)."""
    data = read_bytes(path, max_bytes=max_bytes, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StorageError(f"{what} {os.fspath(path)} is not UTF-8 text (byte {error.start}: "
                           f"{data[error.start:error.start + 1]!r})") from None


def check_writable(path: epath.PathLike, *, what: str = "file") -> None:
    """Refuses, naming it, a target that is a symbolic link or not a regular file (a FIFO, a
    directory, a device): a write would follow it, block on it or destroy it."""
    if is_remote(path):
        return
    text = os.fspath(path)
    try:
        info = os.lstat(text)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise StorageError(f"{what} {text} is a symbolic link (to {os.readlink(text)}): not "
                           "writing through it")
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"{what} {text} is {_kind(info.st_mode)}: not replacing it")


def _stage(path: str, data: bytes, mode: int | None) -> str:
    """``data`` in a new file beside ``path``, created exclusively without following links,
    synced; returns its name. Mode: the existing file's, else ``mode`` (umask applies)."""
    existing = os.lstat(path).st_mode & 0o7777 if os.path.lexists(path) else None
    directory, name = os.path.split(path)
    staged = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644 if mode is None else mode)
    try:
        if existing is not None:
            os.fchmod(descriptor, existing)
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        os.unlink(staged)
        raise
    os.close(descriptor)
    return staged


def write_files(contents: Mapping[epath.PathLike, bytes | str], *, mode: int | None = None,
                what: str = "file") -> None:
    """Writes every ``path -> data`` (str as UTF-8) atomically: all targets are checked
    (:func:`check_writable`) and staged before any is renamed into place, so a refused or failed
    target leaves every file as it was."""
    encoded = {os.fspath(p): d.encode("utf-8") if isinstance(d, str) else bytes(d)
               for p, d in contents.items()}
    for path in encoded:
        check_writable(path, what=what)
    if any(is_remote(path) for path in encoded):
        for path, data in encoded.items():
            epath.Path(path).write_bytes(data)  # an object upload is all or nothing
        return
    staged: dict[str, str] = {}
    try:
        for path, data in encoded.items():
            staged[path] = _stage(path, data, mode)
        for path in encoded:
            check_writable(path, what=what)  # again: nothing swapped in while staging
        for path, temporary in list(staged.items()):
            os.replace(temporary, path)
            del staged[path]
    finally:
        for temporary in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def write_bytes(path: epath.PathLike, data: bytes, *, mode: int | None = None,
                what: str = "file") -> None:
    """Replaces ``path`` by ``data`` atomically, never through a link (:func:`write_files`)."""
    write_files({path: data}, mode=mode, what=what)


def write_text(path: epath.PathLike, text: str, *, mode: int | None = None,
               what: str = "file") -> None:
    """Replaces ``path`` by ``text`` (UTF-8) atomically, never through a link."""
    write_files({path: text}, mode=mode, what=what)


def open_append(path: epath.PathLike, *, truncate: bool = False, binary: bool = False,
                what: str = "file") -> IO:
    """A file object (text, or bytes with ``binary``) appending to the regular local file
    ``path`` (created if absent; emptied first with ``truncate``): a link or non-regular file
    at ``path`` is refused, not followed."""
    text = os.fspath(path)
    check_writable(text, what=what)
    descriptor = os.open(text, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC | (os.O_TRUNC if truncate else os.O_APPEND), 0o644)
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise StorageError(f"{what} {text} is {_kind(info.st_mode)}: not appending to it")
    os.set_blocking(descriptor, True)
    if binary:  # unbuffered: each write (a whole record) reaches the file at once
        return os.fdopen(descriptor, "ab", buffering=0)
    return os.fdopen(descriptor, "a", encoding="utf-8")


def remove(path: epath.PathLike, *, what: str = "file") -> None:
    """Removes the local file or link ``path`` (a link itself, never its target); nothing when
    absent; a directory is refused."""
    text = os.fspath(path)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(text).st_mode):
            raise StorageError(f"{what} {text} is a directory: not replacing it")
        os.unlink(text)


def create_exclusive(path: epath.PathLike, *, what: str = "file") -> None:
    """Creates the empty local file ``path`` for a writer that opens it by name (a memory map):
    whatever was at ``path`` (a stale file of ours, a planted link) is removed, never
    followed (:func:`remove`), and the new file is created exclusively."""
    text = os.fspath(path)
    remove(text, what=what)
    os.close(os.open(text, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644))


def replace(source: epath.PathLike, target: epath.PathLike, *, what: str = "file") -> None:
    """Renames the file ``source`` (this project's own staged file) over ``target``, refusing
    a link or non-regular target."""
    check_writable(target, what=what)
    if is_remote(source) or is_remote(target):
        epath.Path(source).rename(target)
    else:
        os.replace(os.fspath(source), os.fspath(target))
