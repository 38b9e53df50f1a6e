"""Convolution implementations, chosen per backend: XLA's own, or patches + one matmul.

XLA:CPU (jaxlib 0.10) runs the backward pass of convolutions whose spatial size is smaller than
the kernel (the last ResNet stage at 64 px: 2x2 maps under a 3x3 kernel) through a generic
fallback at about 1 GFLOP/s, 50-100x slower than a matmul of the same size; measured with
``benchmarks/conv_layers.py``. Writing such a convolution as "extract the k x k patches, one
matmul with the (k*k*C_in, C_out) kernel" gives XLA only slices, pads and dots, whose gradients
are again slices, pads and dots, all of which it runs at matmul speed.

Two more CPU-only measures of ``"auto"`` (``benchmarks/train_step.py``, docs/performance.md):

* XLA:CPU computes a weight gradient as a convolution over the input transposed from NHWC to
  CHWN. It fuses the cheap elementwise chain that produced the input (BatchNorm, shortcut add,
  ReLU) into that transpose, so the transpose re-reads three or four arrays with a stride of one
  image: 100-480 ms per layer of the ResNet-18 step, 3.5 s of its 9.8 s.
  :func:`materialise` ends the chain with a division by a runtime 1, an operation XLA's fusion
  will not duplicate, so the input is written once and transposed alone (~20 ms per layer).
* A 1x1 convolution with stride s reads every s-th pixel: slicing first and convolving with
  stride 1 gives the same sums, and its gradient is a strided pad instead of a dilated
  convolution (forward + both gradients 1.1-1.45x faster on the ResNet projection shortcuts).

``model.conv_implementation`` picks: ``"xla"`` (``lax.conv_general_dilated`` everywhere: what
TPUs and GPUs want), ``"patches"`` (everywhere), or ``"auto"``: patches on the CPU for layers
whose output is smaller than ``PATCHES_BELOW`` pixels on a side, XLA with the two measures above
for the other CPU layers, XLA alone on every other backend. The kernel parameter has the same
(kh, kw, C_in, C_out) layout in all three, so checkpoints move freely between them.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLEMENTATIONS = ("auto", "xla", "patches")
# "auto" on the CPU: patches for outputs smaller than this many pixels on a side. Measured on a
# 2-core Xeon (AVX-512), jaxlib 0.10.2, ResNet layers at batch 32-128, forward + backward: for
# 2x2 outputs of 3x3 kernels (stride 1 from 2x2, stride 2 from 4x4) XLA's convolution runs at
# 1-4 GFLOP/s and the patches form at 98-131, and 1x1 layers are 1.1-1.9x faster as patches;
# from 4x4 outputs up XLA's own (with the runtime flags of byol_flax.runtime.xla) is 1.1-2x faster.
PATCHES_BELOW = 4


def _pairs(padding: str | Sequence[tuple[int, int]], spatial: Sequence[int],
           kernel: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return list(lax.padtype_to_pads(spatial, kernel, strides, padding))
    return [tuple(p) for p in padding]


def _undilated(lhs_dilation: Any, rhs_dilation: Any) -> bool:
    return all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    """NHWC inputs and HWIO kernels (lax's default for ``None``), as nnx.Conv passes them."""
    return dimension_numbers is None or lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers) == lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))


def conv_via_patches(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]], lhs_dilation: Any = None,
                     rhs_dilation: Any = None, dimension_numbers: Any = None,
                     feature_group_count: int = 1, precision: Any = None,
                     preferred_element_type: Any = None, **_: Any) -> jax.Array:
    """``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels as patches @ kernel.

    Same signature as the lax function (what ``nnx.Conv(conv_general_dilated=...)`` calls);
    dilations and grouped convolutions are not supported and raise.
    """
    if not _undilated(lhs_dilation, rhs_dilation):
        raise NotImplementedError("conv_via_patches: dilated convolutions are not supported")
    if feature_group_count != 1:
        raise NotImplementedError("conv_via_patches: grouped convolutions are not supported")
    if not _is_nhwc(lhs, rhs, dimension_numbers):
        raise NotImplementedError(
            f"conv_via_patches: only NHWC / HWIO layouts, got {dimension_numbers}")
    kernel_h, kernel_w, channels_in, channels_out = rhs.shape
    stride_h, stride_w = window_strides
    (top, bottom), (left, right) = _pairs(padding, lhs.shape[1:3], rhs.shape[:2], window_strides)
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kernel_h) // stride_h + 1
    out_w = (x.shape[2] - kernel_w) // stride_w + 1
    taps = [
        lax.slice(x, (0, i, j, 0),
                  (x.shape[0], i + stride_h * (out_h - 1) + 1, j + stride_w * (out_w - 1) + 1,
                   channels_in), (1, stride_h, stride_w, 1))
        for i in range(kernel_h) for j in range(kernel_w)
    ]
    # Tap-major, channel-minor: the order of rhs.reshape(kh * kw * C_in, C_out).
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    kernel = rhs.reshape(kernel_h * kernel_w * channels_in, channels_out)
    return lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def conv_auto(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
              padding: Any, **kwargs: Any) -> jax.Array:
    """On the CPU: patches for small output maps, otherwise ``lax.conv_general_dilated`` on a
    materialised input (strided 1x1 layers sliced first); elsewhere ``lax``'s convolution.

    Decided at trace time from the shapes and the default backend, so one jitted step holds one
    implementation per layer.
    """
    pads = _pairs(padding, lhs.shape[1:3], rhs.shape[:2], window_strides)
    output_size = [(size + low + high - kernel) // stride + 1 for size, (low, high), kernel, stride
                   in zip(lhs.shape[1:3], pads, rhs.shape[:2], window_strides)]
    if jax.default_backend() != "cpu":
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    if min(output_size) < PATCHES_BELOW:
        return conv_via_patches(lhs, rhs, window_strides, padding, **kwargs)
    if (rhs.shape[:2] == (1, 1) and tuple(window_strides) != (1, 1)
            and all(tuple(pad) == (0, 0) for pad in pads)
            and _undilated(kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"))
            and _is_nhwc(lhs, rhs, kwargs.get("dimension_numbers"))):
        lhs = lhs[:, ::window_strides[0], ::window_strides[1], :]
        window_strides = (1, 1)
    return lax.conv_general_dilated(materialise(lhs, rhs), rhs, window_strides, padding,
                                    **kwargs)


def materialise(x: jax.Array, reference: jax.Array) -> jax.Array:
    """``x`` divided by a 1 computed at run time from ``reference``: x / 1 == x exactly
    (subnormals aside, which XLA:CPU flushes to zero in any arithmetic, the convolution's too).

    XLA's fusion duplicates cheap elementwise producers into every consumer, including the
    transposes of weight gradients, but never duplicates a division: ``x`` is then computed
    once, in memory, and each consumer reads it. The 1 is ``1 + 0 * isnan(r)`` for one element
    ``r`` of ``reference``, which is 1 for every value of ``r`` (NaN and infinities included)
    and which XLA cannot fold away, not knowing the value. Gradients pass through unchanged.
    """
    element = lax.stop_gradient(reference.reshape(-1)[0])
    one = 1 + 0 * jnp.isnan(element).astype(x.dtype)
    return x / one


def conv_function(implementation: str):
    """The ``conv_general_dilated`` to give ``nnx.Conv`` for ``model.conv_implementation``."""
    functions = {"auto": conv_auto, "xla": lax.conv_general_dilated, "patches": conv_via_patches}
    if implementation not in functions:
        raise ValueError(f"conv implementation must be one of {sorted(functions)}, "
                         f"got {implementation!r}")
    return functions[implementation]
