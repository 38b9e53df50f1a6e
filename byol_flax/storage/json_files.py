"""JSON files read strictly and written as standard JSON.

Python's ``json`` accepts what no other reader does (``NaN``, ``Infinity``) and writes it too,
and a file nested a hundred thousand levels deep makes it raise ``RecursionError``. Here a read
is strict UTF-8 (:mod:`byol_flax.storage.files`), standard JSON only, at most
:data:`MAX_DEPTH` levels deep, and checked against the shape its kind of file must have
(:mod:`byol_flax.storage.schemas`); a write has no NaN or infinity (they become ``null``: a
value that could not be computed, which every JSON reader understands).
"""

import json
import math
import os
from typing import Any

from etils import epath

from byol_flax.storage import files
from byol_flax.storage.schemas import Spec, check

MAX_DEPTH = 64


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def loads(text: str | bytes, *, name: str, spec: Spec = None, max_depth: int = MAX_DEPTH
          ) -> Any:
    """The value of the JSON document ``text`` (from ``name``, which error lines name), checked
    against ``spec``; :class:`~byol_flax.storage.files.StorageError` otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise files.StorageError(f"{name} is not UTF-8 text (byte {error.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise files.StorageError(f"{name} nests JSON deeper than {max_depth} levels: not a file "
                                 "this project reads") from None
    except ValueError as error:
        raise files.StorageError(f"{name} is not valid JSON: {error}") from None
    if _depth_exceeds(value, max_depth):
        raise files.StorageError(f"{name} nests JSON deeper than {max_depth} levels: not a file "
                                 "this project reads")
    if spec is not None:
        check(value, spec, name)
    return value


def read(path: epath.PathLike, *, spec: Spec = None, what: str = "JSON file",
         max_bytes: int = files.DEFAULT_MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of the regular file ``path`` (:func:`loads`, read by
    :func:`files.read_text`)."""
    text = files.read_text(path, max_bytes=max_bytes, what=what)
    return loads(text, name=f"{what} {os.fspath(path)}", spec=spec, max_depth=max_depth)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """Standard JSON of ``value`` (non-finite floats as ``null``); ``options`` as ``json.dumps``
    (``indent``, ``sort_keys``, ``default``)."""
    return json.dumps(finite(value), allow_nan=False, **options)


def write(path: epath.PathLike, value: Any, *, what: str = "JSON file",
          mode: int | None = None, **options: Any) -> None:
    """Writes ``value`` as standard JSON to ``path``, atomically, never through a link."""
    files.write_text(path, dumps(value, **options) + "\n", mode=mode, what=what)
