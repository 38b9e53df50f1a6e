"""A verified local copy of named files from a directory, local or ``gs://``.

Training reads local files (random access over the network would starve the input pipeline), so
a remote directory is staged on local disk first. The caller says which files make the copy: an
index file (its name and the bytes it read, e.g. a dataset's manifest) and the files it names,
each with its sha256. The copy is made in ``<destination>.partial`` after a free-space check,
each file is hashed against the index, the directory is stamped with the index's sha256 and
renamed into place: a killed copy never looks complete, a restart resumes it (files already
there are hashed, not copied), and a destination stamped for the same index is used as it is.
Processes of one host take turns through a lock file beside the destination.

What the files hold is the caller's business (its ``check`` runs before the stamp); this module
knows their names, sizes and hashes only. Errors are :class:`StagingError`, one line each.
"""

import dataclasses
import datetime
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent import futures

from etils import epath

from byol_flax.storage import files, json_files, schemas

# A copy whose files were hashed against its index carries this stamp; a restart that finds it,
# for the source's current index, neither copies nor hashes again.
VERIFIED_COPY_STAMP = ".verified_copy.json"
# Free space wanted beyond the files themselves: the index, the stamp, and slack so that the
# copy does not fill the disk other writers (checkpoints, logs) share.
COPY_FREE_SPACE_MARGIN = 1_000_000_000
_GB = 1e9
# The key keeps its historical name: copies stamped before stay valid.
_STAMP = schemas.Obj({"manifest_sha256": str})
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class StagingError(files.StorageError):
    """A copy that cannot be made or verified; the message names the file or directory."""


@dataclasses.dataclass(frozen=True)
class Wording:
    """How the messages name what is copied, so that they speak the caller's terms."""

    copy: str = "copy"  # "... holds files that are not this {copy}'s"
    file: str = "file"
    index: str = "index"
    setting: str = "the destination"  # what a user changes to copy somewhere else


def _bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified_sha256(directory: epath.PathLike, index_name: str) -> str | None:
    """The index sha256 in ``directory``'s stamp, if it is that of the index file beside it."""
    directory = epath.Path(directory)
    try:
        stamp = json_files.read(directory / VERIFIED_COPY_STAMP, spec=_STAMP,
                                what="verified-copy stamp", max_bytes=1 << 16)
        index = files.read_bytes(directory / index_name, what=index_name)
    except OSError:  # absent, damaged or not a file: not a verified copy
        return None
    recorded = stamp["manifest_sha256"]
    return recorded if recorded == _bytes_sha256(index) else None


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _regular_size(path: str) -> int | None:
    """The size of the regular file ``path``; None when absent or anything else (a link, a
    directory): such an entry is never kept, and replacing it is refused naming it."""
    try:
        info = files.check_regular(path, follow_links=False)
    except files.StorageError:
        return None
    return None if info is None else info.st_size


def _check_free_space(needed: int, source: epath.Path, destination: str,
                      wording: Wording) -> None:
    """Fails, giving both sizes, unless the destination's disk has room for ``needed`` bytes."""
    free = shutil.disk_usage(_existing_parent(destination)).free
    if free < needed + COPY_FREE_SPACE_MARGIN:
        raise StagingError(f"not enough disk space to copy {source} to {destination}: it needs "
                           f"{needed / _GB:.2f} GB (+ {COPY_FREE_SPACE_MARGIN / _GB:.2f} GB "
                           f"margin), {free / _GB:.2f} GB are free; point {wording.setting} at a "
                           "larger disk")


def _clear_old_copy(destination: str, partial: str, ours: set[str], names: set[str],
                    wording: Wording) -> None:
    """Moves the ``names`` of an unverified old copy into ``partial``, then removes the rest.

    Only files a copy writes (``ours``) are touched: a destination holding anything else is
    refused.
    """
    if not os.path.isdir(destination):
        return
    if others := sorted(n for n in os.listdir(destination) if n.removesuffix(".tmp") not in ours):
        raise StagingError(f"{destination} holds files that are not this {wording.copy}'s (e.g. "
                           f"{others[0]!r}): not replacing it; empty it or choose another "
                           f"{wording.setting}")
    for name in os.listdir(destination):
        old, new = os.path.join(destination, name), os.path.join(partial, name)
        if name in names and not files.exists(new):
            files.replace(old, new, what=wording.file)  # kept only if its sha256 matches
        else:
            files.remove(old, what=wording.file)
    os.rmdir(destination)


def _check_sha256(path: str, expected: str, wording: Wording) -> None:
    if _regular_size(path) == 0 and expected != _EMPTY_SHA256:
        raise StagingError(f"{wording.file} {path} is empty (0 bytes)")
    if (actual := files.sha256(path, what=wording.file)) != expected:
        raise StagingError(f"{wording.file} {path} is corrupt: sha256 {actual[:16]}... does not "
                           f"match the {wording.index}'s {expected[:16]}...")


def _copy_file(source: epath.Path, partial: str, name: str, sha256: str, size: int,
               wording: Wording) -> None:
    """Puts a verified copy of ``name`` in ``partial``; a kept file is copied again if bad."""
    path = os.path.join(partial, name)
    if _regular_size(path) == size and files.sha256(path, what=wording.file) == sha256:
        return
    tmp = path + ".tmp"
    files.remove(tmp, what=wording.file)  # a leftover of a killed copy, never followed
    (source / name).copy(epath.Path(tmp), overwrite=True)
    files.replace(tmp, path, what=wording.file)
    _check_sha256(path, sha256, wording)  # a fresh copy that does not match: the source is bad


def copy_verified(source: epath.PathLike, destination: epath.PathLike, *, index_name: str,
                  index_bytes: bytes, wanted: Mapping[str, str],
                  check: Callable[[str], None] = lambda directory: None,
                  wording: Wording = Wording(), workers: int = 8) -> epath.Path:
    """Copies ``wanted`` (file name -> sha256) from ``source`` to the local ``destination``,
    with ``index_bytes`` as ``index_name`` beside them, verified; returns ``destination``.

    ``index_bytes`` are what the caller read from ``source`` and took ``wanted`` from: the copy
    holds those bytes even if the source changed since. ``check`` sees the complete directory
    before it is stamped (the caller's own checks of what the files hold).
    """
    source = epath.Path(source)
    destination = os.path.abspath(os.fspath(destination))
    index_sha256 = _bytes_sha256(index_bytes)
    if verified_sha256(destination, index_name) == index_sha256:
        return epath.Path(destination)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with files.open_append(destination + ".lock", what="lock file") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if verified_sha256(destination, index_name) != index_sha256:
            _copy_locked(source, destination, index_name, index_bytes, wanted, check, wording,
                         workers)
    return epath.Path(destination)


def _copy_locked(source: epath.Path, destination: str, index_name: str, index_bytes: bytes,
                 wanted: Mapping[str, str], check: Callable[[str], None], wording: Wording,
                 workers: int) -> None:
    """The copy itself (see copy_verified), under its lock."""
    partial = destination + ".partial"
    os.makedirs(partial, exist_ok=True)
    _clear_old_copy(destination, partial, set(wanted) | {index_name, VERIFIED_COPY_STAMP},
                    set(wanted), wording)
    sizes = {}
    for name in wanted:
        if not files.exists(src := source / name):
            raise StagingError(f"{wording.file} {src} named by the {wording.index} is missing")
        sizes[name] = src.stat().length
    kept = {name for name in wanted
            if _regular_size(os.path.join(partial, name)) == sizes[name]}
    _check_free_space(sum(size for name, size in sizes.items() if name not in kept)
                      + len(index_bytes), source, destination, wording)
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:  # I/O and hashing in C
        for done in [pool.submit(_copy_file, source, partial, name, sha256, sizes[name], wording)
                     for name, sha256 in wanted.items()]:
            done.result()
    files.write_bytes(os.path.join(partial, index_name), index_bytes, what=wording.index)
    check(partial)
    json_files.write(os.path.join(partial, VERIFIED_COPY_STAMP),
                     {"source": str(source), "manifest_sha256": _bytes_sha256(index_bytes),
                      "verified_at": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                     what="verified-copy stamp")
    os.replace(partial, destination)  # destination was cleared above: a directory's rename
