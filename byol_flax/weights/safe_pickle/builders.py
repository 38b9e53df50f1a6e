"""The functions a pickle may name: NumPy's array pickling and dill's helpers, read as data.

An array is rebuilt by :func:`vetted_array` from bytes, a shape and a dtype that it checks
itself (numeric kinds only, the byte count equal to the shape's, no offsets or strides from the
file, all arrays together no larger than the file) and copied into fresh memory. dill's helpers
(``_create_namedtuple``, ``_create_array``, ``_get_attr``, ``_import_module``, ``_load_type``)
are understood without importing or running dill. :data:`NUMERIC_GLOBALS` is the table of all
of them under every name NumPy 1 and 2 and dill write.
"""

import math
import operator
from typing import Any

import numpy as np

from byol_flax.weights.safe_pickle.machine import PickleMachine
from byol_flax.weights.safe_pickle.values import (
    NDARRAY,
    Builder,
    ModuleToken,
    PendingArray,
    PendingDtype,
    Record,
    Token,
    describe,
    is_dotted_name,
    is_identifier,
    shown,
)

MAX_NDIM = 32
MAX_FIELDS = 255
# Numeric dtypes as NumPy pickles them (``dtype('f4', False, True)``); complex is read so that
# the caller can refuse it by name; no object, void, structured, string or datetime dtype.
NUMERIC_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4",
                            "f8", "c8", "c16"})


def vetted_array(reader: PickleMachine, raw: Any, dtype: Any, shape: Any, *,
                 fortran: bool = False) -> np.ndarray:
    """A fresh C-ordered array of ``shape`` and a numeric ``dtype`` from exactly
    ``prod(shape) * itemsize`` bytes of ``raw``: no offsets, strides or object pointers."""
    if type(raw) is not bytes:
        raise reader.refused(f"array data given as {describe(raw)}, not bytes (object arrays "
                             "are refused)")
    if not isinstance(dtype, PendingDtype):
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


def array_from_state(reader: PickleMachine, state: Any) -> np.ndarray:
    """``ndarray.__setstate__``'s ``(version, shape, dtype, is_fortran, data)`` read as data."""
    if type(state) is tuple and len(state) == 5 and state[0] == 1 and type(state[0]) is int:
        state = state[1:]
    if type(state) is not tuple or len(state) != 4:
        raise reader.malformed("array state that is not (version, shape, dtype, order, data)")
    shape, dtype, fortran, raw = state
    if type(fortran) not in (bool, int) or fortran not in (0, 1):
        raise reader.malformed("array order flag that is not a bool")
    return vetted_array(reader, raw, dtype, shape, fortran=bool(fortran))


def set_dtype_state(reader: PickleMachine, dtype: PendingDtype, state: Any) -> None:
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


def build_state(reader: PickleMachine, target: Any, state: Any) -> Any:
    """``BUILD``: only on this reader's array and dtype placeholders."""
    if isinstance(target, PendingArray):
        array = array_from_state(reader, state)
        for key in target.memo_keys:
            if reader._memo.get(key) is target:
                reader._memo[key] = array
        target.memo_keys = []
        return array
    if isinstance(target, PendingDtype) and target.byteorder is None:
        set_dtype_state(reader, target, state)
        return target
    raise reader.refused(f"BUILD on {describe(target)} refused: state is set only on the "
                         "reader's fresh arrays and dtypes")


def _reconstruct(reader: PickleMachine, cls: Any, shape: Any, typecode: Any) -> PendingArray:
    if cls is not NDARRAY or type(shape) is not tuple or shape != (0,) or typecode != b"b":
        raise reader.refused(f"_reconstruct of {describe(cls)}: only numpy.ndarray((0,), 'b'),"
                             " as NumPy pickles an array")
    return PendingArray()


def _dtype(reader: PickleMachine, code: Any, align: Any = False, copy: Any = True
           ) -> PendingDtype:
    if type(code) is not str or code not in NUMERIC_DTYPES:
        raise reader.refused(f"dtype {shown(code)}: only bool, integer, float and complex "
                             "dtypes (no object, void, structured or string dtypes)")
    if align not in (False, 0) or type(copy) not in (bool, int):
        raise reader.refused(f"dtype {shown(code)} with alignment")
    return PendingDtype(code)


def _scalar(reader: PickleMachine, dtype: Any, raw: Any) -> np.generic:
    array = vetted_array(reader, raw, dtype, ())
    return array[()]


def _frombuffer(reader: PickleMachine, raw: Any, dtype: Any, shape: Any, order: Any
                ) -> np.ndarray:
    if order not in ("C", "F"):
        raise reader.malformed("_frombuffer with an order other than 'C' or 'F'")
    return vetted_array(reader, raw, dtype, shape, fortran=order == "F")


def _latin1_bytes(reader: PickleMachine, text: Any, encoding: Any = "utf-8") -> bytes:
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


def _empty_bytes(reader: PickleMachine) -> bytes:
    """Protocol 2 writes ``b""`` as ``bytes()``."""
    return b""


# -- dill's helpers, as data --------------------------------------------------------------------

def _dill_create_namedtuple(reader: PickleMachine, name: Any, fields: Any, module: Any,
                            defaults: Any = None) -> Builder:
    """``dill._dill._create_namedtuple``: the table's stand-in where it has one (with the same
    fields), else a fresh :class:`Record` class from validated field names."""
    if not is_identifier(name) or not is_dotted_name(module):
        raise reader.refused(f"a NamedTuple named {shown(name)} in module {shown(module)}: "
                             "not identifiers")
    if type(fields) not in (tuple, list) or len(fields) > MAX_FIELDS or not all(
            is_identifier(field) and not field.startswith("_") and not hasattr(tuple, field)
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
    reader.count_record_class()
    record = type(name, (Record,), {"__slots__": (), "_fields": fields, **members})
    return Builder(f"{module}.{name}", lambda reader, *values: record(*values), "class", fields)


def _dill_create_array(reader: PickleMachine, function: Any, args: Any, state: Any,
                       npdict: Any = None) -> np.ndarray:
    """``dill._dill._create_array(_reconstruct, args, state, npdict)``: the same vetted path."""
    if function is not RECONSTRUCT or type(args) is not tuple:
        raise reader.refused(f"dill _create_array with {describe(function)}: only NumPy's "
                             "_reconstruct")
    if npdict not in (None, {}):
        raise reader.refused("dill _create_array with attributes on the array")
    return build_state(reader, reader.call(function, args, "REDUCE"), state)


def _dill_import_module(reader: PickleMachine, name: Any, safe: Any = False) -> Token:
    """``dill._dill._import_module(name)``: only the name; nothing is imported."""
    if not is_dotted_name(name):
        raise reader.refused(f"dill _import_module of {shown(name)}: not a module name")
    return ModuleToken(name)


def _dill_get_attr(reader: PickleMachine, module: Any, name: Any) -> Builder | Token:
    """``dill._dill._get_attr(_import_module(M), N)``: allowed exactly where ``M.N`` is."""
    if not isinstance(module, ModuleToken) or type(name) is not str:
        raise reader.refused(f"dill _get_attr on {describe(module)}: only on a module name")
    return reader.resolve_global(module.name, name, " (through dill's _get_attr)")


def _dill_load_type(reader: PickleMachine, name: Any) -> Builder:
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
