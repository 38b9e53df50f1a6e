"""The opcodes of pickle protocols 0-5 (pickletools' descriptions), each a function of the machine.

Each handler reads its argument through :class:`~.machine.PickleMachine`'s checked steps and
pushes only numbers, strings, bytes and fresh ``dict``/``list``/``tuple``s; globals resolve
through the caller's table, ``REDUCE``/``NEWOBJ``/``INST``/``OBJ`` call only this reader's
:class:`~.values.Builder` functions, ``BUILD`` reaches only the reader's own array and dtype
placeholders (:func:`~.builders.build_state`), and the rest (persistent ids, extension codes,
out-of-band buffers, sets) is refused.
"""

import codecs
import pickle
import struct
from collections.abc import Callable
from typing import Any

from byol_flax.weights.safe_pickle.builders import build_state
from byol_flax.weights.safe_pickle.machine import PickleMachine
from byol_flax.weights.safe_pickle.values import PendingArray, describe

MAX_INT_BYTES = 64  # LONG1/LONG4 payloads; a checkpoint's integers are steps and shapes


def stop(reader: PickleMachine) -> None:
    raise AssertionError("handled by the loop")


def _proto(reader: PickleMachine) -> None:
    version = reader._uint(1, "PROTO")
    if version > pickle.HIGHEST_PROTOCOL:
        raise reader.malformed(f"protocol {version}")


def _frame(reader: PickleMachine) -> None:
    length = reader._uint(8, "FRAME")
    if length > reader._size - reader._pos:
        raise reader.malformed(f"FRAME claims {length} bytes, {reader._size - reader._pos} "
                               "remain in the file")


def _mark(reader: PickleMachine) -> None:
    if len(reader._metastack) >= reader._max_depth:
        raise reader.refused(f"MARKs nested more than {reader._max_depth} deep")
    reader._metastack.append(reader._stack)
    reader._stack = []


def _pop(reader: PickleMachine) -> None:
    if reader._stack:
        reader._stack.pop()
    else:
        reader._pop_mark()


def _int_text(reader: PickleMachine) -> None:
    line = reader._line("INT")
    if line in (b"00", b"01"):
        reader._push(line == b"01")
    else:
        reader._push(reader._decimal(line, "INT"))


def _long_text(reader: PickleMachine) -> None:
    line = reader._line("LONG")
    reader._push(reader._decimal(line[:-1] if line.endswith(b"L") else line, "LONG"))


def _long_bytes(width: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        count = reader._uint(width, "LONG length")
        if count > MAX_INT_BYTES:
            raise reader.refused(f"an integer of {count} bytes")
        reader._push(int.from_bytes(reader._take(count, "LONG"), "little", signed=True))
    return load


def _binint(width: int, signed: bool) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        reader._push(int.from_bytes(reader._take(width, "BININT"), "little", signed=signed))
    return load


def _float_text(reader: PickleMachine) -> None:
    try:
        reader._push(float(reader._line("FLOAT")))
    except ValueError:
        raise reader.malformed("FLOAT is not a number") from None


def _binfloat(reader: PickleMachine) -> None:
    reader._push(struct.unpack(">d", reader._take(8, "BINFLOAT"))[0])


def _unicode(width: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        data = reader._take(reader._uint(width, "string length"), "a string")
        try:
            reader._push(data.decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise reader.malformed("a string that is not UTF-8") from None
    return load


def _unicode_text(reader: PickleMachine) -> None:
    try:
        reader._push(reader._line("UNICODE").decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise reader.malformed("UNICODE is not raw-unicode-escape") from None


def _bytes(width: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        reader._push(reader._take(reader._uint(width, "bytes length"), "a byte string"))
    return load


def _ascii_string(reader: PickleMachine, data: bytes) -> None:
    """Python 2 ``str``: read as ASCII text, as ``pickle.Unpickler`` does by default."""
    try:
        reader._push(data.decode("ascii"))
    except UnicodeDecodeError:
        raise reader.malformed("a Python 2 string that is not ASCII") from None


def _binstring(width: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        count = int.from_bytes(reader._take(width, "string length"), "little",
                               signed=width == 4)
        _ascii_string(reader, reader._take(count, "a string"))
    return load


def _string_text(reader: PickleMachine) -> None:
    line = reader._line("STRING")
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise reader.malformed("STRING is not quoted")
    try:
        data = codecs.escape_decode(line[1:-1])[0]
    except ValueError:
        raise reader.malformed("STRING has a bad escape") from None
    _ascii_string(reader, data)


def _constant(value: Any) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        reader._push(value() if callable(value) else value)
    return load


def _tuple_of(count: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        if len(reader._stack) < count:
            raise reader.malformed("stack underflow")
        items = reader._stack[len(reader._stack) - count:]
        del reader._stack[len(reader._stack) - count:]
        reader._push(tuple(items))
    return load


def _tuple_mark(reader: PickleMachine) -> None:
    reader._push(tuple(reader._pop_mark()))


def _list_mark(reader: PickleMachine) -> None:
    reader._push(reader._pop_mark())


def _dict_mark(reader: PickleMachine) -> None:
    items = reader._pop_mark()
    if len(items) % 2:
        raise reader.malformed("DICT with an odd number of items")
    reader._push({reader._key(items[i]): items[i + 1] for i in range(0, len(items), 2)})


def _target(reader: PickleMachine, kind: type, opcode: str) -> Any:
    target = reader._top()
    if type(target) is not kind:
        raise reader.refused(f"{opcode} on {describe(target)}: only on the reader's own "
                             f"{kind.__name__}")
    return target


def _append(reader: PickleMachine) -> None:
    value = reader._pop()
    _target(reader, list, "APPEND").append(value)


def _appends(reader: PickleMachine) -> None:
    items = reader._pop_mark()
    _target(reader, list, "APPENDS").extend(items)


def _setitem(reader: PickleMachine) -> None:
    value = reader._pop()
    key = reader._key(reader._pop())
    _target(reader, dict, "SETITEM")[key] = value


def _setitems(reader: PickleMachine) -> None:
    items = reader._pop_mark()
    if len(items) % 2:
        raise reader.malformed("SETITEMS with an odd number of items")
    target = _target(reader, dict, "SETITEMS")
    for i in range(0, len(items), 2):
        target[reader._key(items[i])] = items[i + 1]


def _memo_put(reader: PickleMachine, key: int) -> None:
    reader.count_object()
    value = reader._top()
    reader._memo[key] = value
    if isinstance(value, PendingArray):
        value.memo_keys.append(key)


def _put_text(reader: PickleMachine) -> None:
    _memo_put(reader, reader._decimal(reader._line("PUT"), "PUT"))


def _put(width: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        _memo_put(reader, reader._uint(width, "PUT"))
    return load


def _memoize(reader: PickleMachine) -> None:
    _memo_put(reader, len(reader._memo))


def _memo_get(reader: PickleMachine, key: int) -> None:
    if key not in reader._memo:
        raise reader.malformed(f"memo key {key} was never stored")
    reader._stack.append(reader._memo[key])


def _get_text(reader: PickleMachine) -> None:
    _memo_get(reader, reader._decimal(reader._line("GET"), "GET"))


def _get(width: int) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        _memo_get(reader, reader._uint(width, "GET"))
    return load


def _global_text(reader: PickleMachine) -> None:
    module = reader._text_line("GLOBAL module")
    name = reader._text_line("GLOBAL name")
    reader._push(reader.resolve_global(module, name))


def _stack_global(reader: PickleMachine) -> None:
    name, module = reader._pop(), reader._pop()
    if type(name) is not str or type(module) is not str:
        raise reader.malformed("STACK_GLOBAL without two strings")
    reader._push(reader.resolve_global(module, name))


def _reduce(reader: PickleMachine) -> None:
    args = reader._pop()
    target = reader._pop()
    reader._push(reader.call(target, args, "REDUCE"))


def _newobj(reader: PickleMachine) -> None:
    args = reader._pop()
    target = reader._pop()
    reader._push(reader.call(target, args, "NEWOBJ"))


def _newobj_ex(reader: PickleMachine) -> None:
    kwargs = reader._pop()
    args = reader._pop()
    target = reader._pop()
    if type(kwargs) is not dict or kwargs:
        raise reader.refused("NEWOBJ_EX with keyword arguments")
    reader._push(reader.call(target, args, "NEWOBJ_EX"))


def _inst(reader: PickleMachine) -> None:
    module = reader._text_line("INST module")
    name = reader._text_line("INST name")
    target = reader.resolve_global(module, name)
    reader._push(reader.call(target, tuple(reader._pop_mark()), "INST"))


def _obj(reader: PickleMachine) -> None:
    items = reader._pop_mark()
    if not items:
        raise reader.malformed("OBJ without a class")
    reader._push(reader.call(items[0], tuple(items[1:]), "OBJ"))


def _build(reader: PickleMachine) -> None:
    state = reader._pop()
    target = reader._pop()
    reader._push(build_state(reader, target, state))


def _refuse(what: str) -> Callable[[PickleMachine], None]:
    def load(reader: PickleMachine) -> None:
        raise reader.refused(what)
    return load


def _pop_mark(reader: PickleMachine) -> None:
    reader._pop_mark()


def _dup(reader: PickleMachine) -> None:
    reader._stack.append(reader._top())


DISPATCH: dict[bytes, Callable[[PickleMachine], None]] = {
    pickle.PROTO: _proto, pickle.FRAME: _frame, pickle.STOP: stop,
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
