"""Process-wide XLA settings that our entry points apply before JAX starts its backends.

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
from jax._src import xla_bridge  # XLA_FLAGS is read when the first backend starts, not at import

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
