"""Process-wide settings: XLA flags our entry points apply before JAX starts its backends, and one
tracing fix applied when ``byol_flax.train_step`` is imported.

XLA:CPU (jaxlib 0.10) hands every convolution to YNNPACK, whose weight-gradient kernels run the
ResNet step at a third of the speed of XLA's other convolution path (measured with
``benchmarks/conv_layers.py`` and ``benchmarks/train_step.py``: ResNet-18 BYOL step 5.6 -> 9.9
images/s on a 2-core Xeon). ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
keeps YNNPACK for everything but single convolutions. The flag only concerns the CPU backend;
TPU and GPU compilers never read it.

The flag is experimental, and an XLA that does not know a flag in ``XLA_FLAGS`` aborts the
process, so it is only added for jaxlib versions it was measured on (``TESTED_JAXLIB``). Set
``BYOL_FLAX_XLA_CPU_FLAGS=0`` to leave ``XLA_FLAGS`` alone; a flag the user already put in
``XLA_FLAGS`` is never overridden.
"""

import logging
import os
from collections.abc import MutableMapping

import jaxlib
from jax._src import core, xla_bridge  # XLA_FLAGS is read when a backend starts, not at import
from jax._src.interpreters import partial_eval

XLA_CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
TESTED_JAXLIB = ("0.10.",)
OPT_OUT = "BYOL_FLAX_XLA_CPU_FLAGS"


def configure_xla_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Adds :data:`XLA_CPU_FLAGS` to ``XLA_FLAGS``; returns the flags it added.

    Must run before the first JAX computation of the process (backends read ``XLA_FLAGS`` once);
    after that it changes nothing and logs a warning.
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return []
    if not jaxlib.__version__.startswith(TESTED_JAXLIB):
        logging.info("XLA:CPU flags not added: jaxlib %s is not one of %s", jaxlib.__version__,
                     TESTED_JAXLIB)
        return []
    if xla_bridge.backends_are_initialized():
        logging.warning("XLA:CPU flags not added: JAX backends are already initialised")
        return []
    current = environ.get("XLA_FLAGS", "")
    present = {flag.split("=")[0] for flag in current.split()}
    added = [f"{name}={value}" for name, value in XLA_CPU_FLAGS.items() if name not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def _sharding_of_a_tracer(tracer: core.Tracer):
    raise AttributeError(f"The 'sharding' attribute is not available on {tracer._error_repr()}.")


def speed_up_tracing() -> bool:
    """Makes ``getattr(tracer, "sharding", None)`` cheap while a jitted function is traced.

    Flax NNX's ``Variable.__setitem__`` (every ``nnx.update``, optimizer update and BatchNorm
    statistics write) asks a traced value for its ``sharding``. JAX (0.10) answers with an
    AttributeError whose message names the operations the value came from, found by scanning
    every equation traced so far: quadratic in the size of the step. Measured on the BYOL step
    with on-device augmentation on a 2-core CPU: tracing ResNet-50 takes 52.8 s, 9.0 s without
    that scan; the tiny test network 6.4 s -> 2.4 s. Only the text of that AttributeError changes
    (``hasattr``/``getattr`` behave the same); concretisation errors keep their full message.
    Returns whether the fix was applied (it is skipped if JAX's classes differ from 0.10's).
    """
    tracer_class = partial_eval.DynamicJaxprTracer
    if "sharding" in tracer_class.__dict__ or not isinstance(
            getattr(core.Tracer, "sharding", None), property):
        return tracer_class.__dict__.get("sharding") is _FAST_SHARDING
    tracer_class.sharding = _FAST_SHARDING
    return True


_FAST_SHARDING = property(_sharding_of_a_tracer)
