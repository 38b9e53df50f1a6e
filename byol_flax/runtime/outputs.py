"""Where a command may write: never over what it did not create.

Every directory a command writes as a whole (an export, a converted dataset, a pre-training or
evaluation workdir, the demo's) carries a marker file naming its kind
(``.byol_flax_output.json``). :func:`check_output_dir` lets a command write to a path only if it
does not exist, is an empty directory, or holds the marker of the same kind: a previous output
that the command may replace or resume. Anything else (a user's folder, a file, a symbolic link,
the current directory or one of its ancestors, a directory inside or around the command's own
input) is refused in one line naming the path, before any work is done.
"""

import os
import re
from collections.abc import Iterable

from etils import epath

from byol_flax.errors import UserError
from byol_flax.storage import json_files, schemas

MARKER_NAME = ".byol_flax_output.json"
KINDS = ("export", "dataset", "pretraining", "evaluation", "demo", "study")
_SHOWN_ENTRIES = 3
MARKER_MAX_BYTES = 64 * 1024


class OutputDirError(UserError, OSError):
    """The output path is not one this command may write (the message says why and what to do)."""

    def __str__(self) -> str:  # OSError's str() would print its args tuple
        return str(self.args[0]) if self.args else ""


def _is_remote(path: str) -> bool:
    return "://" in path


def _read_marker(directory: epath.Path) -> str | None:
    """The kind recorded by the marker in ``directory``, or None without a (readable) marker.
    A marker that is a symbolic link is not ours."""
    marker = directory / MARKER_NAME
    if not _is_remote(os.fspath(directory)) and os.path.islink(os.fspath(marker)):
        return None
    try:
        content = json_files.read(marker, spec=schemas.OUTPUT_MARKER, max_bytes=MARKER_MAX_BYTES,
                                  what="output marker")
    except OSError:  # a FIFO, a device, damaged or foreign: not this project's marker
        return None
    return content["kind"] if content["kind"] in KINDS else None


def _within(inner: str, outer: str) -> bool:
    """Whether the real path ``inner`` is ``outer`` or lies below it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_local_position(path: str, kind: str, inputs: Iterable[str]) -> None:
    if os.path.islink(path):
        raise OutputDirError(f"output {path} is a symbolic link (to {os.readlink(path)}): "
                             f"not writing through it; name the {kind} directory itself")
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputDirError(f"output {path} lies under {ancestor}, which is not a directory: "
                             f"name a directory for the {kind}")
    real = os.path.realpath(path)
    if _within(os.path.realpath(os.getcwd()), real):
        raise OutputDirError(f"output {path} is the current directory or contains it: name a "
                             f"new directory of its own for the {kind}")
    for source in inputs:
        if not source or _is_remote(source):
            continue
        source_real = os.path.realpath(source)
        if _within(real, source_real) or _within(source_real, real):
            raise OutputDirError(f"output {path} and the input {source} contain one another: "
                                 f"write the {kind} to a directory outside its input")


def check_output_dir(out: epath.PathLike, kind: str, *, inputs: Iterable[str] = ()
                     ) -> epath.Path:
    """The absolute path of ``out`` once it is known to be writable as a ``kind`` output.

    Allowed: a path that does not exist, an empty directory, or a directory holding this
    project's marker of the same ``kind``. ``inputs``: paths the command reads; the output may
    be neither inside nor around them. Raises :class:`OutputDirError` otherwise; nothing is
    written here.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {KINDS}")
    text = os.fspath(out)
    if not text:
        raise OutputDirError(f"no output directory given for the {kind}")
    if not _is_remote(text):
        text = os.path.abspath(text)
        _check_local_position(text, kind, [os.fspath(i) for i in inputs])
    path = epath.Path(text)
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputDirError(f"output {path} is a file, not a directory: not replacing it; name "
                             f"a new directory for the {kind}")
    # The marker staged by another process of this run (renamed into place a moment later)
    # is not a foreign file.
    staged_marker = re.compile(rf"\.{re.escape(MARKER_NAME)}\.[0-9a-f]+\.tmp")
    entries = sorted(entry.name for entry in path.iterdir()
                     if not staged_marker.fullmatch(entry.name))
    if not entries:
        return path
    found = _read_marker(path)
    if found == kind:
        return path
    if found is not None:
        raise OutputDirError(f"output {path} holds a byol_flax {found}, not a {kind}: not "
                             f"replacing it; name another directory for the {kind}")
    shown = ", ".join(repr(name) for name in entries[:_SHOWN_ENTRIES])
    more = f" and {len(entries) - _SHOWN_ENTRIES} more" if len(entries) > _SHOWN_ENTRIES else ""
    raise OutputDirError(f"output {path} holds files byol_flax did not write ({shown}{more}): "
                         f"not touching them; name a new or empty directory for the {kind}")


def write_marker(directory: epath.PathLike, kind: str) -> None:
    """Marks ``directory`` as a ``kind`` output (so a later run may replace or resume it)."""
    directory = epath.Path(directory)
    marker = directory / MARKER_NAME
    if not _is_remote(os.fspath(directory)) and os.path.islink(os.fspath(marker)):
        raise OutputDirError(f"{marker} is a symbolic link: not writing through it")
    if _read_marker(directory) != kind:
        json_files.write(marker, {"kind": kind, "written_by": "byol_flax"}, what="output marker")


def claim_output_dir(out: epath.PathLike, kind: str, *, inputs: Iterable[str] = ()
                     ) -> epath.Path:
    """:func:`check_output_dir`, then creates the directory and marks it: for outputs written in
    place over time (a workdir, a dataset being converted), so that a killed run's partial
    output is recognised as this project's on the next start."""
    path = check_output_dir(out, kind, inputs=inputs)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind)
    return path
