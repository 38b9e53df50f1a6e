"""A pickle reader that builds only numbers and plain containers, for files from outside.

``pickle.load`` runs whatever the file names, and even a ``find_class`` allow-list of NumPy's
own constructors is not enough: ``numpy.ndarray(shape, dtype('O'), buffer, offset)`` turns
file bytes into object pointers or copies process memory, and ``BUILD`` sets attributes on any
class the list lets through. This package is a small pickle virtual machine of its own, written
from the opcode descriptions in :mod:`pickletools`, in which no opcode reaches Python or NumPy
code with arguments from the file:

* a global resolves only through the caller's table to one of this package's :class:`Builder`
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

Layout, from the bottom up (no module imports one above it): ``values`` (errors, the names a
pickle may use, placeholders, messages), ``machine`` (the bytes, stack, memo and budgets of one
read, with every length checked: :data:`~.machine.MAX_OBJECTS` and the other read limits),
``builders`` (NumPy's array pickling and dill's helpers as data: :data:`NUMERIC_GLOBALS`),
``opcodes`` (one function per opcode), ``unpickler`` (:class:`SafeUnpickler`: the opcode loop
and the check of the result) and ``files`` (:func:`read_pickle_file`). A limit is read where it
is defined: a test that lowers one patches that module (``machine.MAX_OBJECTS``), not this one.
"""

from byol_flax.weights.safe_pickle.builders import (
                                                   EMPTY_BYTES,
                                                   MAX_FIELDS,
                                                   MAX_NDIM,
                                                   NUMERIC_DTYPES,
                                                   NUMERIC_GLOBALS,
                                                   RECONSTRUCT,
                                                   array_from_state,
                                                   set_dtype_state,
                                                   vetted_array,
)
from byol_flax.weights.safe_pickle.files import read_pickle_file
from byol_flax.weights.safe_pickle.machine import (
                                                   MAX_DEPTH,
                                                   MAX_OBJECTS,
                                                   MAX_RECORD_CLASSES,
                                                   PickleMachine,
)
from byol_flax.weights.safe_pickle.opcodes import MAX_INT_BYTES
from byol_flax.weights.safe_pickle.unpickler import SafeUnpickler
from byol_flax.weights.safe_pickle.values import (
                                                   MAX_NAME_LENGTH,
                                                   NDARRAY,
                                                   Builder,
                                                   PickleReadError,
                                                   Record,
                                                   Token,
                                                   UnsafePickleError,
                                                   describe,
                                                   shown,
)

__all__ = [
    "EMPTY_BYTES", "MAX_DEPTH", "MAX_FIELDS", "MAX_INT_BYTES", "MAX_NAME_LENGTH", "MAX_NDIM",
    "MAX_OBJECTS", "MAX_RECORD_CLASSES", "NDARRAY", "NUMERIC_DTYPES", "NUMERIC_GLOBALS",
    "RECONSTRUCT", "Builder", "PickleMachine", "PickleReadError", "Record", "SafeUnpickler",
    "Token", "UnsafePickleError", "array_from_state", "describe", "read_pickle_file",
    "set_dtype_state", "shown", "vetted_array",
]
