"""A pickle reader that builds only numbers and plain containers, for files from outside.

``pickle.load`` runs whatever the file names, and even a ``find_class`` allow-list of NumPy's
own constructors is not enough: ``numpy.ndarray(shape, dtype('O'), buffer, offset)`` turns
file bytes into object pointers or copies process memory, and ``BUILD`` sets attributes on any
class the list lets through. This module is a small pickle virtual machine of its own, written
from the opcode descriptions in :mod:`pickletools`, in which no opcode reaches Python or NumPy
code with arguments from the file:

* a global resolves only through the caller's table to one of this module's :class:`Builder`
  functions (or an inert :class:`Token`); anything else is refused by name, escaped;
* an array is rebuilt by :func:`vetted_array` from bytes, a shape and a dtype that it checks
  itself (numeric kinds only, the byte count equal to the shape's, no offsets or strides from
  the file, all arrays together no larger than the file) and copied into fresh memory;
* ``BUILD`` is accepted only on the array and dtype placeholders this reader made; ``SETITEM``
  and ``APPEND`` only on the plain ``dict`` and ``list`` it made; dict keys only scalars;
* every length is checked against the bytes left in the file before anything is read,
  nesting is bounded (:data:`MAX_DEPTH`), the result is walked without recursion (cycles
  refused), and a ``MemoryError`` or ``RecursionError`` becomes one line;
* dill's helpers (``_create_namedtuple``, ``_create_array``, ``_get_attr``, ``_import_module``,
  ``_load_type``) are understood as data, without importing or running dill.

Errors are :class:`PickleReadError` (the file is not a pickle of numbers) and its subclass
:class:`UnsafePickleError` (the file asks for something this reader refuses), one line each,
naming the file; text from the file is shown escaped (:func:`shown`).
"""

import codecs
import dataclasses
import hashlib
import io
import keyword
import math
import operator
import os
import pickle
import stat
import struct
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from byol_flax.errors import UserError

MAX_DEPTH = 100  # nested containers; the release's deepest path has 6
MAX_NDIM = 32
MAX_INT_BYTES = 64  # LONG1/LONG4 payloads; a checkpoint's integers are steps and shapes
MAX_FIELDS = 255
MAX_NAME_LENGTH = 200
# Values the file may create (each opcode byte can make a 50-100 byte object): a release has
# well under 100,000; the bound keeps a small crafted file from filling memory with containers.
MAX_OBJECTS = 10_000_000
MAX_RECORD_CLASSES = 1_000  # NamedTuple classes a dill file defines; the release has five
# Numeric dtypes as NumPy pickles them (``dtype('f4', False, True)``); complex is read so that
# the caller can refuse it by name; no object, void, structured, string or datetime dtype.
NUMERIC_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4",
                            "f8", "c8", "c16"})


class PickleReadError(UserError, ValueError):
    """The file cannot be read as a pickle of numbers: not a regular file, truncated, or an
    opcode sequence no pickler writes (the message names the file and the byte offset)."""


class UnsafePickleError(PickleReadError):
    """The pickle asks for something this reader refuses (a global outside the table, an object
    dtype, state on a class, a persistent id); nothing of it was run."""


def shown(text: Any) -> str:
    """``text`` as it may appear in a one-line message: printable ASCII as it is, anything else
    (newlines, terminal escapes, right-to-left marks, bytes) escaped as ``ascii()`` writes it,
    so a name chosen by a file cannot print a line of its own."""
    if isinstance(text, str) and len(text) <= MAX_NAME_LENGTH and text.isascii() \
            and text.isprintable():
        return text
    if isinstance(text, str | bytes) and len(text) > MAX_NAME_LENGTH:
        return ascii(text[:MAX_NAME_LENGTH]) + "..."
    return ascii(text)


# -- What a pickle can name ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Builder:
    """A callable a pickle may name: one of this reader's functions, called with the reader and
    the file's arguments. ``kind="class"`` may also be called through ``NEWOBJ``/``INST``/``OBJ``;
    ``fields`` are the field names a dill ``_create_namedtuple`` must give for it (``None``: any
    valid names)."""

    name: str
    build: Callable[..., Any]
    kind: str = "function"
    fields: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Token:
    """A global that is only ever an argument (``numpy.ndarray`` for ``_reconstruct``), or a
    module named by dill's ``_import_module``: it cannot be called, built or filled."""

    name: str


NDARRAY = Token("numpy.ndarray")


class _PendingArray:
    """What ``_reconstruct`` returns until ``BUILD`` gives it its state (memo keys kept so the
    finished array replaces it there too)."""

    def __init__(self) -> None:
        self.memo_keys: list[int] = []


class _PendingDtype:
    """A numeric dtype by its pickled name; ``BUILD`` may set its byte order once."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder: str | None = None

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.code)
        if self.byteorder in ("<", ">") and dtype.itemsize > 1:
            dtype = dtype.newbyteorder(self.byteorder)
        return dtype


class _ModuleToken(Token):
    """dill's ``_import_module(name)``: a name, never an import."""


class Record(tuple):
    """The plain stand-in for a NamedTuple class a dill pickle defines by its field names
    (``_create_namedtuple``): a tuple with read-only fields, made without ``eval``."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __new__(cls, *values: Any) -> "Record":
        if len(values) != len(cls._fields):
            raise TypeError(f"{cls.__name__} takes {len(cls._fields)} fields")
        return super().__new__(cls, values)


def _is_identifier(text: Any) -> bool:
    return (isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text)
            and len(text) <= MAX_NAME_LENGTH)


def _is_dotted_name(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= MAX_NAME_LENGTH and all(
        _is_identifier(part) for part in text.split("."))


# -- The reader -----------------------------------------------------------------------------------

_SCALARS = (str, int, bytes, float, bool, type(None))  # dict keys, and leaves beside arrays


class SafeUnpickler:
    """Reads one pickle from ``data`` (bytes, or a binary file of ``size`` bytes read from its
    position) with the globals of ``allowed`` ((module, name) -> :class:`Builder` or
    :class:`Token`) and nothing else."""

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
        if not isinstance(key, _SCALARS) or isinstance(key, np.generic):
            raise self.refused(f"a dict key of type {describe(key)}: only strings and numbers")
        return key

    # -- loading

    def load(self) -> Any:
        """The pickle's value, every leaf a number, string, bytes or NumPy array."""
        try:
            value = self._run()
            self._check_tree(value)
            return value
        except PickleReadError:
            raise
        except (ValueError, TypeError, OverflowError, LookupError, struct.error) as error:
            # A check this reader lacks; never the file's text, which may be crafted.
            raise PickleReadError(f"{self.source}: not a readable pickle: "
                                  f"{type(error).__name__} near byte {self._op_at}") from None
        except MemoryError:
            raise PickleReadError(f"{self.source}: ran out of memory reading the pickle (near "
                                  f"byte {self._op_at}): not a checkpoint this reader takes"
                                  ) from None
        except RecursionError:
            raise PickleReadError(f"{self.source}: nested too deeply to read (near byte "
                                  f"{self._op_at})") from None

    def _run(self) -> Any:
        dispatch = _DISPATCH
        while True:
            self._op_at = self._pos
            opcode = self._take(1, "an opcode")
            handler = dispatch.get(opcode)
            if handler is None:
                raise self.malformed(f"unknown opcode {opcode!r}")
            if handler is _stop:
                if len(self._stack) != 1 or self._metastack:
                    raise self.malformed("STOP with a stack that is not one value")
                return self._stack.pop()
            handler(self)

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

    def build(self, target: Any, state: Any) -> Any:
        """``BUILD``: only on this reader's array and dtype placeholders."""
        if isinstance(target, _PendingArray):
            array = array_from_state(self, state)
            for key in target.memo_keys:
                if self._memo.get(key) is target:
                    self._memo[key] = array
            target.memo_keys = []
            return array
        if isinstance(target, _PendingDtype) and target.byteorder is None:
            set_dtype_state(self, target, state)
            return target
        raise self.refused(f"BUILD on {describe(target)} refused: state is set only on the "
                           "reader's fresh arrays and dtypes")

    def spend_array_bytes(self, count: int) -> None:
        self._array_bytes_left -= count
        if self._array_bytes_left < 0:
            raise self.refused(f"arrays that add up to more bytes than the file's {self._size}")

    def spend_encoded_bytes(self, count: int) -> None:
        self._encoded_bytes_left -= count
        if self._encoded_bytes_left < 0:
            raise self.refused(f"byte strings that add up to more than the file's {self._size}")

    # -- the result

    def _check_tree(self, root: Any) -> None:
        """Every leaf a number, string, bytes or numeric array; containers at most
        ``max_depth`` deep, without cycles; walked with an explicit stack, not recursion."""
        if not _is_container(root):
            self._check_leaf(root)
            return
        heights: dict[int, int] = {}
        path: list[list[Any]] = [[root, iter(_children(root)), 0]]
        on_path = {id(root)}
        while path:
            frame = path[-1]
            for child in frame[1]:
                if not _is_container(child):
                    self._check_leaf(child)
                    continue
                if id(child) in on_path:
                    raise self.refused("a container that contains itself")
                if id(child) in heights:
                    frame[2] = max(frame[2], heights[id(child)])
                    if len(path) + heights[id(child)] > self._max_depth:
                        raise self.refused(f"containers nested more than {self._max_depth} "
                                           "deep")
                    continue
                if len(path) >= self._max_depth:
                    raise self.refused(f"containers nested more than {self._max_depth} deep")
                path.append([child, iter(_children(child)), 0])
                on_path.add(id(child))
                break
            else:
                path.pop()
                on_path.discard(id(frame[0]))
                heights[id(frame[0])] = frame[2] + 1
                if path:
                    path[-1][2] = max(path[-1][2], frame[2] + 1)

    def _check_leaf(self, leaf: Any) -> None:
        if type(leaf) in _SCALARS:
            return
        if isinstance(leaf, np.ndarray | np.generic) and leaf.dtype.kind in "biufc":
            return
        raise self.refused(f"the pickle leaves {describe(leaf)} in its data")


def _is_container(value: Any) -> bool:
    return type(value) in (dict, list) or isinstance(value, tuple)


def _children(value: Any) -> Any:
    return value.values() if type(value) is dict else value


def describe(value: Any) -> str:
    """What a stack value is, for messages (never its ``repr``: it may be deep or cyclic)."""
    if isinstance(value, Builder):
        return f"the global {shown(value.name)}"
    if isinstance(value, Token):
        return f"{shown(value.name)}"
    if isinstance(value, _PendingArray):
        return "an array without its state"
    if isinstance(value, _PendingDtype):
        return "a dtype"
    return f"a {shown(type(value).__name__)}"


# -- Opcodes (pickletools' descriptions; protocols 0-5) ----------------------------------------

def _stop(reader: SafeUnpickler) -> None:
    raise AssertionError("handled by the loop")


def _proto(reader: SafeUnpickler) -> None:
    version = reader._uint(1, "PROTO")
    if version > pickle.HIGHEST_PROTOCOL:
        raise reader.malformed(f"protocol {version}")


def _frame(reader: SafeUnpickler) -> None:
    length = reader._uint(8, "FRAME")
    if length > reader._size - reader._pos:
        raise reader.malformed(f"FRAME claims {length} bytes, {reader._size - reader._pos} "
                               "remain in the file")


def _mark(reader: SafeUnpickler) -> None:
    if len(reader._metastack) >= reader._max_depth:
        raise reader.refused(f"MARKs nested more than {reader._max_depth} deep")
    reader._metastack.append(reader._stack)
    reader._stack = []


def _pop(reader: SafeUnpickler) -> None:
    if reader._stack:
        reader._stack.pop()
    else:
        reader._pop_mark()


def _int_text(reader: SafeUnpickler) -> None:
    line = reader._line("INT")
    if line in (b"00", b"01"):
        reader._push(line == b"01")
    else:
        reader._push(reader._decimal(line, "INT"))


def _long_text(reader: SafeUnpickler) -> None:
    line = reader._line("LONG")
    reader._push(reader._decimal(line[:-1] if line.endswith(b"L") else line, "LONG"))


def _long_bytes(width: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        count = reader._uint(width, "LONG length")
        if count > MAX_INT_BYTES:
            raise reader.refused(f"an integer of {count} bytes")
        reader._push(int.from_bytes(reader._take(count, "LONG"), "little", signed=True))
    return load


def _binint(width: int, signed: bool) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        reader._push(int.from_bytes(reader._take(width, "BININT"), "little", signed=signed))
    return load


def _float_text(reader: SafeUnpickler) -> None:
    try:
        reader._push(float(reader._line("FLOAT")))
    except ValueError:
        raise reader.malformed("FLOAT is not a number") from None


def _binfloat(reader: SafeUnpickler) -> None:
    reader._push(struct.unpack(">d", reader._take(8, "BINFLOAT"))[0])


def _unicode(width: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        data = reader._take(reader._uint(width, "string length"), "a string")
        try:
            reader._push(data.decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise reader.malformed("a string that is not UTF-8") from None
    return load


def _unicode_text(reader: SafeUnpickler) -> None:
    try:
        reader._push(reader._line("UNICODE").decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise reader.malformed("UNICODE is not raw-unicode-escape") from None


def _bytes(width: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        reader._push(reader._take(reader._uint(width, "bytes length"), "a byte string"))
    return load


def _ascii_string(reader: SafeUnpickler, data: bytes) -> None:
    """Python 2 ``str``: read as ASCII text, as ``pickle.Unpickler`` does by default."""
    try:
        reader._push(data.decode("ascii"))
    except UnicodeDecodeError:
        raise reader.malformed("a Python 2 string that is not ASCII") from None


def _binstring(width: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        count = int.from_bytes(reader._take(width, "string length"), "little",
                               signed=width == 4)
        _ascii_string(reader, reader._take(count, "a string"))
    return load


def _string_text(reader: SafeUnpickler) -> None:
    line = reader._line("STRING")
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise reader.malformed("STRING is not quoted")
    try:
        data = codecs.escape_decode(line[1:-1])[0]
    except ValueError:
        raise reader.malformed("STRING has a bad escape") from None
    _ascii_string(reader, data)


def _constant(value: Any) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        reader._push(value() if callable(value) else value)
    return load


def _tuple_of(count: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        if len(reader._stack) < count:
            raise reader.malformed("stack underflow")
        items = reader._stack[len(reader._stack) - count:]
        del reader._stack[len(reader._stack) - count:]
        reader._push(tuple(items))
    return load


def _tuple_mark(reader: SafeUnpickler) -> None:
    reader._push(tuple(reader._pop_mark()))


def _list_mark(reader: SafeUnpickler) -> None:
    reader._push(reader._pop_mark())


def _dict_mark(reader: SafeUnpickler) -> None:
    items = reader._pop_mark()
    if len(items) % 2:
        raise reader.malformed("DICT with an odd number of items")
    reader._push({reader._key(items[i]): items[i + 1] for i in range(0, len(items), 2)})


def _target(reader: SafeUnpickler, kind: type, opcode: str) -> Any:
    target = reader._top()
    if type(target) is not kind:
        raise reader.refused(f"{opcode} on {describe(target)}: only on the reader's own "
                             f"{kind.__name__}")
    return target


def _append(reader: SafeUnpickler) -> None:
    value = reader._pop()
    _target(reader, list, "APPEND").append(value)


def _appends(reader: SafeUnpickler) -> None:
    items = reader._pop_mark()
    _target(reader, list, "APPENDS").extend(items)


def _setitem(reader: SafeUnpickler) -> None:
    value = reader._pop()
    key = reader._key(reader._pop())
    _target(reader, dict, "SETITEM")[key] = value


def _setitems(reader: SafeUnpickler) -> None:
    items = reader._pop_mark()
    if len(items) % 2:
        raise reader.malformed("SETITEMS with an odd number of items")
    target = _target(reader, dict, "SETITEMS")
    for i in range(0, len(items), 2):
        target[reader._key(items[i])] = items[i + 1]


def _memo_put(reader: SafeUnpickler, key: int) -> None:
    reader.count_object()
    value = reader._top()
    reader._memo[key] = value
    if isinstance(value, _PendingArray):
        value.memo_keys.append(key)


def _put_text(reader: SafeUnpickler) -> None:
    _memo_put(reader, reader._decimal(reader._line("PUT"), "PUT"))


def _put(width: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        _memo_put(reader, reader._uint(width, "PUT"))
    return load


def _memoize(reader: SafeUnpickler) -> None:
    _memo_put(reader, len(reader._memo))


def _memo_get(reader: SafeUnpickler, key: int) -> None:
    if key not in reader._memo:
        raise reader.malformed(f"memo key {key} was never stored")
    reader._stack.append(reader._memo[key])


def _get_text(reader: SafeUnpickler) -> None:
    _memo_get(reader, reader._decimal(reader._line("GET"), "GET"))


def _get(width: int) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        _memo_get(reader, reader._uint(width, "GET"))
    return load


def _global_text(reader: SafeUnpickler) -> None:
    module = reader._text_line("GLOBAL module")
    name = reader._text_line("GLOBAL name")
    reader._push(reader.resolve_global(module, name))


def _stack_global(reader: SafeUnpickler) -> None:
    name, module = reader._pop(), reader._pop()
    if type(name) is not str or type(module) is not str:
        raise reader.malformed("STACK_GLOBAL without two strings")
    reader._push(reader.resolve_global(module, name))


def _reduce(reader: SafeUnpickler) -> None:
    args = reader._pop()
    target = reader._pop()
    reader._push(reader.call(target, args, "REDUCE"))


def _newobj(reader: SafeUnpickler) -> None:
    args = reader._pop()
    target = reader._pop()
    reader._push(reader.call(target, args, "NEWOBJ"))


def _newobj_ex(reader: SafeUnpickler) -> None:
    kwargs = reader._pop()
    args = reader._pop()
    target = reader._pop()
    if type(kwargs) is not dict or kwargs:
        raise reader.refused("NEWOBJ_EX with keyword arguments")
    reader._push(reader.call(target, args, "NEWOBJ_EX"))


def _inst(reader: SafeUnpickler) -> None:
    module = reader._text_line("INST module")
    name = reader._text_line("INST name")
    target = reader.resolve_global(module, name)
    reader._push(reader.call(target, tuple(reader._pop_mark()), "INST"))


def _obj(reader: SafeUnpickler) -> None:
    items = reader._pop_mark()
    if not items:
        raise reader.malformed("OBJ without a class")
    reader._push(reader.call(items[0], tuple(items[1:]), "OBJ"))


def _build(reader: SafeUnpickler) -> None:
    state = reader._pop()
    target = reader._pop()
    reader._push(reader.build(target, state))


def _refuse(what: str) -> Callable[[SafeUnpickler], None]:
    def load(reader: SafeUnpickler) -> None:
        raise reader.refused(what)
    return load


def _pop_mark(reader: SafeUnpickler) -> None:
    reader._pop_mark()


def _dup(reader: SafeUnpickler) -> None:
    reader._stack.append(reader._top())


_DISPATCH: dict[bytes, Callable[[SafeUnpickler], None]] = {
    pickle.PROTO: _proto, pickle.FRAME: _frame, pickle.STOP: _stop,
    pickle.MARK: _mark, pickle.POP: _pop, pickle.POP_MARK: _pop_mark,
    pickle.DUP: _dup,
    pickle.NONE: _constant(None), pickle.NEWTRUE: _constant(True),
    pickle.NEWFALSE: _constant(False),
    pickle.INT: _int_text, pickle.LONG: _long_text, pickle.BININT: _binint(4, True),
    pickle.BININT1: _binint(1, False), pickle.BININT2: _binint(2, False),
    pickle.LONG1: _long_bytes(1), pickle.LONG4: _long_bytes(4),
    pickle.FLOAT: _float_text, pickle.BINFLOAT: _binfloat,
    pickle.UNICODE: _unicode_text, pickle.SHORT_BINUNICODE: _unicode(1),
    pickle.BINUNICODE: _unicode(4), pickle.BINUNICODE8: _unicode(8),
    pickle.SHORT_BINBYTES: _bytes(1), pickle.BINBYTES: _bytes(4), pickle.BINBYTES8: _bytes(8),
    pickle.BYTEARRAY8: _bytes(8),
    pickle.STRING: _string_text, pickle.SHORT_BINSTRING: _binstring(1),
    pickle.BINSTRING: _binstring(4),
    pickle.EMPTY_TUPLE: _constant(()), pickle.TUPLE1: _tuple_of(1),
    pickle.TUPLE2: _tuple_of(2), pickle.TUPLE3: _tuple_of(3), pickle.TUPLE: _tuple_mark,
    pickle.EMPTY_LIST: _constant(list), pickle.LIST: _list_mark, pickle.APPEND: _append,
    pickle.APPENDS: _appends,
    pickle.EMPTY_DICT: _constant(dict), pickle.DICT: _dict_mark, pickle.SETITEM: _setitem,
    pickle.SETITEMS: _setitems,
    pickle.PUT: _put_text, pickle.BINPUT: _put(1), pickle.LONG_BINPUT: _put(4),
    pickle.MEMOIZE: _memoize,
    pickle.GET: _get_text, pickle.BINGET: _get(1), pickle.LONG_BINGET: _get(4),
    pickle.GLOBAL: _global_text, pickle.STACK_GLOBAL: _stack_global,
    pickle.REDUCE: _reduce, pickle.NEWOBJ: _newobj, pickle.NEWOBJ_EX: _newobj_ex,
    pickle.INST: _inst, pickle.OBJ: _obj, pickle.BUILD: _build,
    pickle.PERSID: _refuse("refused a persistent id"),
    pickle.BINPERSID: _refuse("refused a persistent id"),
    pickle.EXT1: _refuse("refused an extension-registry code"),
    pickle.EXT2: _refuse("refused an extension-registry code"),
    pickle.EXT4: _refuse("refused an extension-registry code"),
    pickle.NEXT_BUFFER: _refuse("refused an out-of-band buffer"),
    pickle.READONLY_BUFFER: _refuse("refused an out-of-band buffer"),
    pickle.EMPTY_SET: _refuse("refused a set: a checkpoint holds arrays and mappings"),
    pickle.FROZENSET: _refuse("refused a set: a checkpoint holds arrays and mappings"),
    pickle.ADDITEMS: _refuse("refused a set: a checkpoint holds arrays and mappings"),
}


# -- Arrays: NumPy's pickled form read as data -------------------------------------------------

def vetted_array(reader: SafeUnpickler, raw: Any, dtype: Any, shape: Any, *,
                 fortran: bool = False) -> np.ndarray:
    """A fresh C-ordered array of ``shape`` and a numeric ``dtype`` from exactly
    ``prod(shape) * itemsize`` bytes of ``raw``: no offsets, strides or object pointers."""
    if type(raw) is not bytes:
        raise reader.refused(f"array data given as {describe(raw)}, not bytes (object arrays "
                             "are refused)")
    if not isinstance(dtype, _PendingDtype):
        raise reader.refused(f"array dtype given as {describe(dtype)}")
    if type(shape) not in (tuple, list) or len(shape) > MAX_NDIM or not all(
            type(size) is int and size >= 0 for size in shape):
        raise reader.malformed(f"an array shape that is not up to {MAX_NDIM} sizes >= 0")
    resolved = dtype.resolve()
    count = math.prod(shape)
    if count * resolved.itemsize != len(raw):
        raise reader.malformed(f"an array of shape {tuple(shape)} {resolved} needs "
                               f"{count * resolved.itemsize} bytes, the file gives {len(raw)}")
    reader.spend_array_bytes(len(raw))
    if resolved.kind == "b":  # any byte other than 0 or 1 is not a NumPy bool
        flat = np.frombuffer(raw, np.uint8) != 0
    else:
        flat = np.frombuffer(raw, resolved)
    try:
        array = flat.reshape(tuple(shape), order="F" if fortran else "C")
    except (ValueError, OverflowError):  # sizes NumPy cannot index, even of an empty array
        raise reader.malformed(f"an array shape {tuple(shape)} NumPy cannot make") from None
    return np.array(array, order="C", copy=True)


def array_from_state(reader: SafeUnpickler, state: Any) -> np.ndarray:
    """``ndarray.__setstate__``'s ``(version, shape, dtype, is_fortran, data)`` read as data."""
    if type(state) is tuple and len(state) == 5 and state[0] == 1 and type(state[0]) is int:
        state = state[1:]
    if type(state) is not tuple or len(state) != 4:
        raise reader.malformed("array state that is not (version, shape, dtype, order, data)")
    shape, dtype, fortran, raw = state
    if type(fortran) not in (bool, int) or fortran not in (0, 1):
        raise reader.malformed("array order flag that is not a bool")
    return vetted_array(reader, raw, dtype, shape, fortran=bool(fortran))


def set_dtype_state(reader: SafeUnpickler, dtype: _PendingDtype, state: Any) -> None:
    """``dtype.__setstate__``'s ``(version, byteorder, subarray, names, fields, elsize,
    alignment, flags[, metadata])``: only a byte order; no subarray, fields or metadata."""
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise reader.malformed("dtype state that is not NumPy's")
    _, byteorder, subarray, names, fields, *numbers = state
    metadata = numbers[3] if len(numbers) == 4 else None
    if byteorder not in ("<", ">", "|", "=") or any(
            part is not None for part in (subarray, names, fields, metadata)) or not all(
            type(number) is int for number in numbers[:3]):
        raise reader.refused(f"dtype {shown(dtype.code)} with a subarray, fields, metadata or "
                             "an unknown byte order (only plain numeric dtypes)")
    dtype.byteorder = byteorder


def _reconstruct(reader: SafeUnpickler, cls: Any, shape: Any, typecode: Any) -> _PendingArray:
    if cls is not NDARRAY or type(shape) is not tuple or shape != (0,) or typecode != b"b":
        raise reader.refused(f"_reconstruct of {describe(cls)}: only numpy.ndarray((0,), 'b'),"
                             " as NumPy pickles an array")
    return _PendingArray()


def _dtype(reader: SafeUnpickler, code: Any, align: Any = False, copy: Any = True
           ) -> _PendingDtype:
    if type(code) is not str or code not in NUMERIC_DTYPES:
        raise reader.refused(f"dtype {shown(code)}: only bool, integer, float and complex "
                             "dtypes (no object, void, structured or string dtypes)")
    if align not in (False, 0) or type(copy) not in (bool, int):
        raise reader.refused(f"dtype {shown(code)} with alignment")
    return _PendingDtype(code)


def _scalar(reader: SafeUnpickler, dtype: Any, raw: Any) -> np.generic:
    array = vetted_array(reader, raw, dtype, ())
    return array[()]


def _frombuffer(reader: SafeUnpickler, raw: Any, dtype: Any, shape: Any, order: Any
                ) -> np.ndarray:
    if order not in ("C", "F"):
        raise reader.malformed("_frombuffer with an order other than 'C' or 'F'")
    return vetted_array(reader, raw, dtype, shape, fortran=order == "F")


def _latin1_bytes(reader: SafeUnpickler, text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocol 2 writes ``bytes`` as ``_codecs.encode(str, "latin1")``; no other codec."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise reader.refused(f"_codecs.encode with {shown(encoding)}: only latin-1 byte "
                             "literals")
    reader.spend_encoded_bytes(len(text))
    try:
        return text.encode("latin1")
    except UnicodeEncodeError:
        raise reader.malformed("a latin-1 byte literal with characters beyond latin-1"
                               ) from None


def _empty_bytes(reader: SafeUnpickler) -> bytes:
    """Protocol 2 writes ``b""`` as ``bytes()``."""
    return b""


# -- dill's helpers, as data --------------------------------------------------------------------

def _dill_create_namedtuple(reader: SafeUnpickler, name: Any, fields: Any, module: Any,
                            defaults: Any = None) -> Builder:
    """``dill._dill._create_namedtuple``: the table's stand-in where it has one (with the same
    fields), else a fresh :class:`Record` class from validated field names."""
    if not _is_identifier(name) or not _is_dotted_name(module):
        raise reader.refused(f"a NamedTuple named {shown(name)} in module {shown(module)}: "
                             "not identifiers")
    if type(fields) not in (tuple, list) or len(fields) > MAX_FIELDS or not all(
            _is_identifier(field) and not field.startswith("_") and not hasattr(tuple, field)
            for field in fields) or len(set(fields)) != len(fields):
        raise reader.refused(f"NamedTuple {shown(module)}.{shown(name)} with field names that "
                             "are not distinct public identifiers")
    if defaults is not None and (type(defaults) is not tuple or len(defaults) > len(fields)):
        raise reader.malformed(f"NamedTuple {shown(name)} with defaults that are not a tuple")
    fields = tuple(fields)
    known = reader.allowed.get((module, name))
    if isinstance(known, Builder) and known.kind == "class":
        if known.fields is not None and known.fields != fields:
            raise reader.refused(f"NamedTuple {shown(module)}.{shown(name)} with fields "
                                 f"{shown(', '.join(fields))}, expected "
                                 f"{', '.join(known.fields)}")
        return known
    members = {field: property(operator.itemgetter(index)) for index, field in
               enumerate(fields)}
    reader.record_classes_left -= 1
    if reader.record_classes_left < 0:
        raise reader.refused(f"more than {MAX_RECORD_CLASSES} NamedTuple classes")
    record = type(name, (Record,), {"__slots__": (), "_fields": fields, **members})
    return Builder(f"{module}.{name}", lambda reader, *values: record(*values), "class", fields)


def _dill_create_array(reader: SafeUnpickler, function: Any, args: Any, state: Any,
                       npdict: Any = None) -> np.ndarray:
    """``dill._dill._create_array(_reconstruct, args, state, npdict)``: the same vetted path."""
    if function is not RECONSTRUCT or type(args) is not tuple:
        raise reader.refused(f"dill _create_array with {describe(function)}: only NumPy's "
                             "_reconstruct")
    if npdict not in (None, {}):
        raise reader.refused("dill _create_array with attributes on the array")
    return reader.build(reader.call(function, args, "REDUCE"), state)


def _dill_import_module(reader: SafeUnpickler, name: Any, safe: Any = False) -> Token:
    """``dill._dill._import_module(name)``: only the name; nothing is imported."""
    if not _is_dotted_name(name):
        raise reader.refused(f"dill _import_module of {shown(name)}: not a module name")
    return _ModuleToken(name)


def _dill_get_attr(reader: SafeUnpickler, module: Any, name: Any) -> Builder | Token:
    """``dill._dill._get_attr(_import_module(M), N)``: allowed exactly where ``M.N`` is."""
    if not isinstance(module, _ModuleToken) or type(name) is not str:
        raise reader.refused(f"dill _get_attr on {describe(module)}: only on a module name")
    return reader.resolve_global(module.name, name, " (through dill's _get_attr)")


def _dill_load_type(reader: SafeUnpickler, name: Any) -> Builder:
    """``dill._dill._load_type("bytes")``, which dill writes for an empty byte string."""
    if name != "bytes":
        raise reader.refused(f"dill _load_type of {shown(name)}: only 'bytes'")
    return EMPTY_BYTES


RECONSTRUCT = Builder("numpy.core.multiarray._reconstruct", _reconstruct)
EMPTY_BYTES = Builder("builtins.bytes", _empty_bytes, "class")
_DTYPE = Builder("numpy.dtype", _dtype, "class")
_SCALAR = Builder("numpy.core.multiarray.scalar", _scalar)
_FROMBUFFER = Builder("numpy.core.numeric._frombuffer", _frombuffer)
_CODECS_ENCODE = Builder("_codecs.encode", _latin1_bytes)

# NumPy's array pickling under every module path NumPy 1 and 2 (and dill through
# ``_import_module``) write it, protocol 2's byte literals, and dill's helpers.
NUMERIC_GLOBALS: dict[tuple[str, str], Builder | Token] = {
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    **{(f"numpy.{core}.{module}", "_reconstruct"): RECONSTRUCT
       for core in ("core", "_core") for module in ("multiarray", "_multiarray_umath")},
    **{(f"numpy.{core}.{module}", "scalar"): _SCALAR
       for core in ("core", "_core") for module in ("multiarray", "_multiarray_umath")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("_codecs", "encode"): _CODECS_ENCODE,
    ("__builtin__", "bytes"): EMPTY_BYTES,
    ("builtins", "bytes"): EMPTY_BYTES,
    ("dill._dill", "_create_namedtuple"): Builder("dill._dill._create_namedtuple",
                                                  _dill_create_namedtuple),
    ("dill._dill", "_create_array"): Builder("dill._dill._create_array", _dill_create_array),
    ("dill._dill", "_import_module"): Builder("dill._dill._import_module",
                                              _dill_import_module),
    ("dill._dill", "_get_attr"): Builder("dill._dill._get_attr", _dill_get_attr),
    ("dill._dill", "_load_type"): Builder("dill._dill._load_type", _dill_load_type),
}


# -- Files ------------------------------------------------------------------------------------

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
