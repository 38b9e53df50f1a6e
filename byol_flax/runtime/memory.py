"""Host memory the process no longer uses, handed back to the operating system.

Compiling a large step makes XLA's compiler allocate and free about a gigabyte of small blocks
(ResNet-50 BYOL step: RSS 0.86 -> 1.97 GB while compiling). glibc keeps freed blocks in its
heap, so without a trim that memory stays resident for the whole run and adds to the step's own
buffers: the peak RSS of the ResNet-50 benchmark fell from 2.88 to 2.03 GB with one trim between
compiling and the first step (``benchmarks/train_step.py``; docs/performance.md).
"""

import ctypes
import ctypes.util
import functools
import logging


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Returns the C heap's free pages to the OS (``malloc_trim(0)``); whether it could.

    Safe at any time and from any thread; costs milliseconds. Elsewhere than glibc it does
    nothing and returns False.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    logging.debug("free C heap returned to the operating system (malloc_trim)")
    return True
