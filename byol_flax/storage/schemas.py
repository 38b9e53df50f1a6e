"""The shape each kind of JSON file must have, checked before any field is used.

A spec is a Python type (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``; ``int``
excludes ``bool``, ``float`` accepts ints), a tuple of them, :class:`Obj` (required and optional
keys, each with its spec), :class:`ListOf`, :class:`DictOf`, or None (anything). A mismatch is
one :class:`~byol_flax.storage.files.StorageError` naming the file, the key path and what was
expected.
"""

import dataclasses
from typing import Any, Union

from byol_flax.storage.files import StorageError


@dataclasses.dataclass(frozen=True)
class Obj:
    """A JSON object with ``required`` keys and ``optional`` ones (others allowed)."""

    required: dict[str, "Spec"] = dataclasses.field(default_factory=dict)
    optional: dict[str, "Spec"] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A JSON array whose every item matches ``item``."""

    item: "Spec"


@dataclasses.dataclass(frozen=True)
class DictOf:
    """A JSON object whose every value matches ``value`` (keys are strings)."""

    value: "Spec"


Spec = Union[type, tuple, Obj, ListOf, DictOf, None]
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
          dict: "an object", list: "an array", type(None): "null"}


def _matches_type(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(spec: Spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, (Obj, DictOf)):
        return "an object"
    if isinstance(spec, ListOf):
        return "an array"
    return _NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def _got(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check(value: Any, spec: Spec, where: str) -> None:
    """Raises :class:`StorageError` unless ``value`` matches ``spec`` (walked without recursion
    into Python's stack limit: specs are shallow)."""
    pending = [(value, spec, "")]
    while pending:
        item, kind, path = pending.pop()
        if kind is None:
            continue
        if isinstance(kind, tuple):
            if not any(_fits_shallow(item, k) for k in kind):
                _fail(where, path, kind, item)
            match = next(k for k in kind if _fits_shallow(item, k))
            pending.append((item, match, path))
            continue
        if isinstance(kind, Obj):
            if not isinstance(item, dict):
                _fail(where, path, kind, item)
            for key, sub in kind.required.items():
                if key not in item:
                    raise StorageError(f"{where}: key {path + key!r} is missing")
                pending.append((item[key], sub, f"{path}{key}."))
            for key, sub in kind.optional.items():
                if key in item:
                    pending.append((item[key], sub, f"{path}{key}."))
        elif isinstance(kind, ListOf):
            if not isinstance(item, list):
                _fail(where, path, kind, item)
            pending.extend((sub, kind.item, f"{path}{i}.") for i, sub in enumerate(item))
        elif isinstance(kind, DictOf):
            if not isinstance(item, dict):
                _fail(where, path, kind, item)
            pending.extend((sub, kind.value, f"{path}{key}.") for key, sub in item.items())
        elif not _matches_type(item, kind):
            _fail(where, path, kind, item)


def _fits_shallow(value: Any, kind: Spec) -> bool:
    if kind is None:
        return True
    if isinstance(kind, (Obj, DictOf)):
        return isinstance(value, dict)
    if isinstance(kind, ListOf):
        return isinstance(value, list)
    if isinstance(kind, tuple):
        return any(_fits_shallow(value, k) for k in kind)
    return _matches_type(value, kind)


def _fail(where: str, path: str, spec: Spec, value: Any) -> None:
    key = f"key {path.rstrip('.')!r}" if path else "the document"
    raise StorageError(f"{where}: {key} should be {_describe(spec)}, not {_got(value)}")


# The project's JSON files. Each names only what its readers use; other keys are allowed (a
# newer version may add some).
NUMBER = (int, float)
LEASE = Obj({"host": str, "pid": int, "token": str, "heartbeat": NUMBER},
            {"boot_id": (str, type(None)), "process_start": (str, type(None)), "started": str,
             "pid_namespace": (str, type(None))})
OUTPUT_MARKER = Obj({"kind": str})
_SHARD = Obj({"file": str, "num_records": int, "sha256": str})
MANIFEST = Obj({"schema_version": int, "dataset": str, "label_names": ListOf(str),
                "splits": DictOf(Obj({"num_records": int, "shards": ListOf(_SHARD)}))},
               {"source": dict})
RESULTS = Obj({"protocol": str, "test": DictOf((int, float, type(None)))})
MODEL_CARD = Obj({}, {"evaluations": ListOf(dict), "pretrain_config": (dict, type(None))})
SWEEP_POINT = Obj({"point": dict, "selection": dict})
ENCODER_CONFIG = Obj({"model": dict}, {"format": int, "sha256": DictOf(str)})
SAFETENSORS_METADATA = Obj({}, {"architecture": dict})
FEATURE_CACHE_ENTRY = Obj({"version": int, "key": dict, "shape": ListOf(int), "dtype": str,
                           "labels_shape": ListOf(int), "manifest_sha256": str,
                           "features_sha256": str, "labels_sha256": str})
