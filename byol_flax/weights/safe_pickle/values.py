"""What a pickle can name and what the reader's stack may hold, and how messages show them.

Nothing here reads a file: these are the errors, the inert names (:class:`Builder`,
:class:`Token`), the placeholders only this reader makes (an array or dtype waiting for its
state) and :func:`describe` / :func:`shown`, which name a value in a one-line message without
its ``repr`` or raw text from the file.
"""

import dataclasses
import keyword
from collections.abc import Callable
from typing import Any

import numpy as np

from byol_flax.errors import UserError

MAX_NAME_LENGTH = 200


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


class PendingArray:
    """What ``_reconstruct`` returns until ``BUILD`` gives it its state (memo keys kept so the
    finished array replaces it there too)."""

    def __init__(self) -> None:
        self.memo_keys: list[int] = []


class PendingDtype:
    """A numeric dtype by its pickled name; ``BUILD`` may set its byte order once."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder: str | None = None

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.code)
        if self.byteorder in ("<", ">") and dtype.itemsize > 1:
            dtype = dtype.newbyteorder(self.byteorder)
        return dtype


class ModuleToken(Token):
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


def is_identifier(text: Any) -> bool:
    return (isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text)
            and len(text) <= MAX_NAME_LENGTH)


def is_dotted_name(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= MAX_NAME_LENGTH and all(
        is_identifier(part) for part in text.split("."))


SCALARS = (str, int, bytes, float, bool, type(None))  # dict keys, and leaves beside arrays


def describe(value: Any) -> str:
    """What a stack value is, for messages (never its ``repr``: it may be deep or cyclic)."""
    if isinstance(value, Builder):
        return f"the global {shown(value.name)}"
    if isinstance(value, Token):
        return f"{shown(value.name)}"
    if isinstance(value, PendingArray):
        return "an array without its state"
    if isinstance(value, PendingDtype):
        return "a dtype"
    return f"a {shown(type(value).__name__)}"
