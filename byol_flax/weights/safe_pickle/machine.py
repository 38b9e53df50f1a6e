"""The pickle machine's state and the checked steps every opcode is made of.

:class:`PickleMachine` holds the bytes of one pickle, its stack, marks and memo, and the budgets
that bound what a small file can make. Every length is checked against the bytes left before
anything is read, every value the file makes is counted, and a global is answered only from the
caller's table; the opcodes (:mod:`.opcodes`) and builders (:mod:`.builders`) are written in
these steps only.
"""

import io
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from byol_flax.weights.safe_pickle.values import (
    SCALARS,
    Builder,
    PickleReadError,
    Token,
    UnsafePickleError,
    describe,
    shown,
)

MAX_DEPTH = 100  # nested containers; the release's deepest path has 6
# Values the file may create (each opcode byte can make a 50-100 byte object): a release has
# well under 100,000; the bound keeps a small crafted file from filling memory with containers.
MAX_OBJECTS = 10_000_000
MAX_RECORD_CLASSES = 1_000  # NamedTuple classes a dill file defines; the release has five


class PickleMachine:
    """The state of one read of ``data`` (bytes, or a binary file of ``size`` bytes read from its
    position) with the globals of ``allowed`` ((module, name) -> :class:`Builder` or
    :class:`Token`) and nothing else; :class:`~.unpickler.SafeUnpickler` runs it."""

    def __init__(self, data: bytes | BinaryIO, *, source: str,
                 allowed: Mapping[tuple[str, str], Builder | Token], size: int | None = None,
                 max_depth: int = MAX_DEPTH):
        if isinstance(data, bytes | bytearray):
            data, size = io.BytesIO(data), len(data)
        if size is None:
            raise TypeError("a file needs its size: lengths are checked against it")
        self._file = data
        self._size = size
        self.source = shown(source)
        self.allowed = allowed
        self._max_depth = max_depth
        self._pos = 0
        self._op_at = 0
        self._stack: list[Any] = []
        self._metastack: list[list[Any]] = []
        self._memo: dict[int, Any] = {}
        self._objects_left = MAX_OBJECTS
        self.record_classes_left = MAX_RECORD_CLASSES
        # Bytes that arrays and ``_codecs.encode`` may make, each at most the file's size: an
        # honest pickle holds every array's bytes once.
        self._array_bytes_left = self._size
        self._encoded_bytes_left = self._size

    # -- errors

    def malformed(self, what: str) -> PickleReadError:
        return PickleReadError(f"{self.source}: not a readable pickle: {what} (opcode at byte "
                               f"{self._op_at})")

    def refused(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.source}: {what} (opcode at byte {self._op_at}); "
                                 "nothing in the file was run")

    # -- reading bytes: every length is checked against what is left before anything is read

    def _take(self, count: int, what: str) -> bytes:
        left = self._size - self._pos
        if count < 0 or count > left:
            raise self.malformed(f"{what} claims {count} bytes, {left} remain in the file")
        data = self._file.read(count)
        self._pos += len(data)
        if len(data) != count:
            raise self.malformed("the file ended early (it shrank while it was read)")
        return data

    def _uint(self, width: int, what: str) -> int:
        return int.from_bytes(self._take(width, what), "little")

    def _line(self, what: str) -> bytes:
        line = self._file.readline(self._size - self._pos)
        self._pos += len(line)
        if not line.endswith(b"\n"):
            raise self.malformed(f"{what} has no end of line")
        return line[:-1]

    def _text_line(self, what: str) -> str:
        try:
            return self._line(what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.malformed(f"{what} is not UTF-8") from None

    def _decimal(self, line: bytes, what: str) -> int:
        try:
            return int(line)
        except ValueError:  # not digits, or more digits than Python converts
            raise self.malformed(f"{what} is not a decimal integer") from None

    # -- the stack

    def _pop(self) -> Any:
        if not self._stack:
            raise self.malformed("stack underflow")
        return self._stack.pop()

    def _top(self) -> Any:
        if not self._stack:
            raise self.malformed("stack underflow")
        return self._stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self._metastack:
            raise self.malformed("no MARK to pop to")
        items, self._stack = self._stack, self._metastack.pop()
        return items

    def count_object(self) -> None:
        """One more value or memo entry the file made, within :data:`MAX_OBJECTS`."""
        self._objects_left -= 1
        if self._objects_left < 0:
            raise self.refused(f"more than {MAX_OBJECTS:,} values")

    def _push(self, value: Any) -> None:
        """A value the file made (GET and DUP push what exists, without counting)."""
        self.count_object()
        self._stack.append(value)

    def _key(self, key: Any) -> Any:
        if not isinstance(key, SCALARS) or isinstance(key, np.generic):
            raise self.refused(f"a dict key of type {describe(key)}: only strings and numbers")
        return key

    def count_record_class(self) -> None:
        """One more NamedTuple class the file defines, within :data:`MAX_RECORD_CLASSES`."""
        self.record_classes_left -= 1
        if self.record_classes_left < 0:
            raise self.refused(f"more than {MAX_RECORD_CLASSES} NamedTuple classes")

    # -- calling what the file names

    def resolve_global(self, module: str, name: str, via: str = "") -> Builder | Token:
        found = self.allowed.get((module, name))
        if found is None:
            raise self.refused(f"refused to load global {shown(module)}.{shown(name)}{via}: the "
                               "reader builds only arrays and plain containers")
        return found

    def call(self, target: Any, args: Any, how: str) -> Any:
        if not isinstance(target, Builder):
            raise self.refused(f"{how} on {describe(target)}: only the reader's own functions "
                               "are called")
        if how != "REDUCE" and target.kind != "class":
            raise self.refused(f"{how} on {shown(target.name)}, which is not a class")
        if type(args) is not tuple:
            raise self.malformed(f"{how} of {shown(target.name)} with {describe(args)} "
                                 "arguments")
        try:
            return target.build(self, *args)
        except TypeError:
            raise self.malformed(f"{shown(target.name)} called with {len(args)} arguments of "
                                 "the wrong kind") from None

    def spend_array_bytes(self, count: int) -> None:
        self._array_bytes_left -= count
        if self._array_bytes_left < 0:
            raise self.refused(f"arrays that add up to more bytes than the file's {self._size}")

    def spend_encoded_bytes(self, count: int) -> None:
        self._encoded_bytes_left -= count
        if self._encoded_bytes_left < 0:
            raise self.refused(f"byte strings that add up to more than the file's {self._size}")
