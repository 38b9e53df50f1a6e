"""ResNet v1 (post-activation) encoders f, as used by BYOL (Appendix A, Table 9).

Layout follows the official BYOL encoder (Haiku ResNet v1): a 7x7/2 stem with max-pool for
ImageNet-size inputs (or a 3x3/1 stem without max-pool for 32-px images), four stages with
strides (1, 2, 2, 2), a projection shortcut on the first block of every stage, and the
representation y taken after the final global average pool (2048 x width for bottleneck nets).
"""

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from byol_flax.models.conv import conv_function

Stem = Literal["imagenet", "small"]

# Haiku's default initializers, which the official BYOL code used; Appendix G notes that the
# initialisation scale does not change results.
CONV_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """BatchNorm hyper-parameters of Appendix J.1 (``batchnorm_kwargs``): decay 0.9, eps 1e-5."""

    decay: float = 0.9
    eps: float = 1e-5

    def make(self, num_features: int, *, rngs: nnx.Rngs, zero_scale: bool = False,
             dtype: Any = None) -> nnx.BatchNorm:
        scale_init = jax.nn.initializers.zeros if zero_scale else jax.nn.initializers.ones
        return nnx.BatchNorm(num_features, momentum=self.decay, epsilon=self.eps,
                             scale_init=scale_init, dtype=dtype, rngs=rngs)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, *, dtype: Any, implementation: str,
          rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding="SAME", use_bias=False, kernel_init=CONV_INIT, dtype=dtype,
                    conv_general_dilated=conv_function(implementation), rngs=rngs)


class ResidualBlock(nnx.Module):
    """Post-activation residual block.

    ``zero_init_residual``: start the block's last BatchNorm scale at 0 (Goyal et al., 2017), so
    the block begins as the identity. The paper's results used scale 1 (the official README's
    note on batch normalisation: its code's zero-initialisation was not used for the paper and
    hurts the widest networks), which is the default here.
    """

    def __init__(self, in_channels: int, channels: int, *, stride: int, bottleneck: bool,
                 use_projection: bool, bn: BatchNormConfig, dtype: Any,
                 conv_implementation: str = "auto", zero_init_residual: bool = False,
                 rngs: nnx.Rngs):
        conv = functools.partial(_conv, dtype=dtype, implementation=conv_implementation,
                                 rngs=rngs)
        inner = channels // 4 if bottleneck else channels
        if bottleneck:
            shapes = [(in_channels, inner, 1, 1), (inner, inner, 3, stride),
                      (inner, channels, 1, 1)]
        else:
            shapes = [(in_channels, inner, 3, stride), (inner, channels, 3, 1)]
        self.convs = nnx.List([conv(i, o, k, s) for i, o, k, s in shapes])
        self.norms = nnx.List([
            bn.make(o, rngs=rngs, dtype=dtype,
                    zero_scale=zero_init_residual and idx == len(shapes) - 1)
            for idx, (_, o, _, _) in enumerate(shapes)
        ])
        if use_projection:
            self.shortcut_conv = conv(in_channels, channels, 1, stride)
            self.shortcut_norm = bn.make(channels, rngs=rngs, dtype=dtype)
        else:
            self.shortcut_conv = None
            self.shortcut_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_norm(self.shortcut_conv(x))
        for idx, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x))
            if idx < len(self.convs) - 1:
                x = jax.nn.relu(x)
        return jax.nn.relu(x + shortcut)


class ResNet(nnx.Module):
    """ResNet v1 torso without classifier: images (B, H, W, 3) -> representation y (B, D)."""

    def __init__(self, *, blocks_per_stage: tuple[int, ...], stage_channels: tuple[int, ...],
                 bottleneck: bool, width_multiplier: int = 1, stem: Stem = "imagenet",
                 stem_channels: int = 64, in_channels: int = 3,
                 bn: BatchNormConfig = BatchNormConfig(), dtype: Any = None,
                 conv_implementation: str = "auto", zero_init_residual: bool = False,
                 rngs: nnx.Rngs):
        if stem not in ("imagenet", "small"):
            raise ValueError(f"encoder stem must be 'imagenet' or 'small', got {stem!r}")
        if len(blocks_per_stage) != len(stage_channels):
            raise ValueError("blocks_per_stage and stage_channels must have the same length")
        self.stem = stem
        width = stem_channels * width_multiplier
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.stem_conv = _conv(in_channels, width, kernel, stride, dtype=dtype,
                               implementation=conv_implementation, rngs=rngs)
        self.stem_norm = bn.make(width, rngs=rngs, dtype=dtype)
        blocks = []
        for stage, (num_blocks, channels) in enumerate(zip(blocks_per_stage, stage_channels)):
            channels *= width_multiplier
            for index in range(num_blocks):
                first = index == 0
                blocks.append(ResidualBlock(
                    width, channels, stride=(1 if stage == 0 else 2) if first else 1,
                    bottleneck=bottleneck, use_projection=first, bn=bn, dtype=dtype,
                    conv_implementation=conv_implementation,
                    zero_init_residual=zero_init_residual, rngs=rngs))
                width = channels
        self.blocks = nnx.List(blocks)
        self.num_features = width

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_norm(self.stem_conv(images)))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2))
