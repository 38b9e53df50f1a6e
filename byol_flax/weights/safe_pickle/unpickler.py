"""The reader: runs a pickle's opcodes on the machine and checks what it built.

The value it returns has only numbers, strings, bytes and numeric NumPy arrays as leaves, in
plain containers at most ``max_depth`` deep and without cycles (walked without recursion);
anything it could not check becomes one :class:`~.values.PickleReadError` line.
"""

import struct
from typing import Any

import numpy as np

from byol_flax.weights.safe_pickle.machine import PickleMachine
from byol_flax.weights.safe_pickle.opcodes import DISPATCH, stop
from byol_flax.weights.safe_pickle.values import SCALARS, PickleReadError, describe


class SafeUnpickler(PickleMachine):
    """Reads one pickle from ``data`` (bytes, or a binary file of ``size`` bytes read from its
    position) with the globals of ``allowed`` ((module, name) -> :class:`Builder` or
    :class:`Token`) and nothing else."""

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
        dispatch = DISPATCH
        while True:
            self._op_at = self._pos
            opcode = self._take(1, "an opcode")
            handler = dispatch.get(opcode)
            if handler is None:
                raise self.malformed(f"unknown opcode {opcode!r}")
            if handler is stop:
                if len(self._stack) != 1 or self._metastack:
                    raise self.malformed("STOP with a stack that is not one value")
                return self._stack.pop()
            handler(self)

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
        if type(leaf) in SCALARS:
            return
        if isinstance(leaf, np.ndarray | np.generic) and leaf.dtype.kind in "biufc":
            return
        raise self.refused(f"the pickle leaves {describe(leaf)} in its data")


def _is_container(value: Any) -> bool:
    return type(value) in (dict, list) or isinstance(value, tuple)


def _children(value: Any) -> Any:
    return value.values() if type(value) is dict else value
