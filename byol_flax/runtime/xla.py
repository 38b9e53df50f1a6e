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

The tracing fix (:func:`speed_up_tracing`) replaces one property of a private JAX class. It is
applied only on the JAX versions it was checked on (``TESTED_JAX``) and only if the class still
looks as it did there; otherwise nothing is patched, tracing is slower and every result is the
same. One log line per process says which happened. ``tests/test_runtime.py`` fails when the
installed JAX moves the internals it replaces.
"""

import logging
import os
from collections.abc import MutableMapping
from typing import Any, NoReturn

import jax
import jaxlib

try:  # private modules: an import error here must not stop the entry points that import us
    from jax._src import core, xla_bridge  # XLA_FLAGS is read when a backend starts
    from jax._src.interpreters import partial_eval
except ImportError:  # pragma: no cover - only on a JAX that moved them
    core = xla_bridge = partial_eval = None

XLA_CPU_FLAGS = {
    "--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
    # The memory-minimising schedule: ResNet-18 BYOL step buffers 2148 -> 1994 MB, peak RSS
    # 3048 -> 2799 MB, images/s equal within the machine's noise (docs/performance.md).
    "--xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}
TESTED_JAXLIB = ("0.10.",)
# JAX versions whose tracer classes speed_up_tracing was checked against (tests/test_runtime.py).
TESTED_JAX = ("0.10.",)
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
    if xla_bridge is None:
        logging.info("XLA:CPU flags not added: jax._src.xla_bridge is not importable")
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


def _sharding_of_a_tracer(tracer: Any) -> NoReturn:
    raise AttributeError(f"The 'sharding' attribute is not available on {tracer._error_repr()}.")


_FAST_SHARDING = property(_sharding_of_a_tracer)
_tracing_outcome_logged = False


def tracing_patch_blocker() -> str | None:
    """Why :func:`speed_up_tracing` would not patch this JAX (``None``: it would).

    The patch is only safe where ``Tracer.sharding`` is the property that raises AttributeError
    and ``DynamicJaxprTracer`` inherits it, as in the versions of ``TESTED_JAX``.
    """
    if not jax.__version__.startswith(TESTED_JAX):
        return f"jax {jax.__version__} is not one of the tested versions {TESTED_JAX}"
    if partial_eval is None or core is None:
        return "jax._src.core or jax._src.interpreters.partial_eval is not importable"
    tracer_class = getattr(partial_eval, "DynamicJaxprTracer", None)
    if not isinstance(tracer_class, type) or not issubclass(tracer_class, core.Tracer):
        return "jax._src.interpreters.partial_eval.DynamicJaxprTracer is not a core.Tracer"
    if not isinstance(core.Tracer.__dict__.get("sharding"), property):
        return "jax._src.core.Tracer.sharding is not a property"
    own = tracer_class.__dict__.get("sharding")
    if own is not None and own is not _FAST_SHARDING:
        return "DynamicJaxprTracer defines its own sharding"
    if not callable(getattr(core.Tracer, "_error_repr", None)):
        return "jax._src.core.Tracer._error_repr is missing"
    return None


def speed_up_tracing() -> bool:
    """Makes ``getattr(tracer, "sharding", None)`` cheap while a jitted function is traced.

    Flax NNX's ``Variable.__setitem__`` (every ``nnx.update``, optimizer update and BatchNorm
    statistics write) asks a traced value for its ``sharding``. JAX (0.10) answers with an
    AttributeError whose message names the operations the value came from, found by scanning
    every equation traced so far: quadratic in the size of the step. Measured on the BYOL step
    with on-device augmentation on a 2-core CPU: tracing ResNet-50 takes 52.8 s, 9.0 s without
    that scan; the tiny test network 6.4 s -> 2.4 s. Only the text of that AttributeError changes
    (``hasattr``/``getattr`` behave the same); concretisation errors keep their full message.

    Returns whether the fix is in place. On a JAX outside ``TESTED_JAX``, or whose classes
    differ from the tested ones (:func:`tracing_patch_blocker`), nothing is patched: tracing is
    slower, results are the same. The outcome is logged once per process.
    """
    global _tracing_outcome_logged
    blocker = tracing_patch_blocker()
    if blocker is None:
        partial_eval.DynamicJaxprTracer.sharding = _FAST_SHARDING
    if not _tracing_outcome_logged:
        _tracing_outcome_logged = True
        if blocker is None:
            logging.info("Tracing speed-up applied (jax %s): DynamicJaxprTracer.sharding "
                         "raises without scanning the trace", jax.__version__)
        else:
            logging.warning("Tracing speed-up not applied (%s): tracing large steps is slower, "
                            "results are unchanged", blocker)
    return blocker is None
