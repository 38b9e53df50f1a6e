"""Builds NNX modules with all initialisers in one compiled program.

Eager initialisation compiles one small program per parameter shape, and on XLA:CPU each random
initialiser takes seconds to compile at the default optimisation level (about 20 s for the tiny
test ResNet, most of a CPU run's start-up). Here the module is traced once (``nnx.eval_shape``
for the structure, ``jax.jit`` for the values); on CPU the program is compiled without LLVM
optimisation, which is irrelevant for a program run once. Values equal eager ones to float32
rounding (the same threefry bits).
"""

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_module(build: Callable[[], M]) -> M:
    """``build()`` (a module constructor call), its initialisers compiled as one program."""
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    state = jax.jit(lambda: nnx.state(build()), compiler_options=options)()
    return nnx.merge(graphdef, state)
