"""Projector g and predictor q: MLPs of Appendix A (Linear 4096 -> BN -> ReLU -> Linear 256).

Depth is the number of Linear layers (Table 14), so depth 1 is a single Linear. The output layer
has neither BatchNorm nor ReLU ("Contrary to SimCLR, the output of this MLP is not batch
normalized"); like the official code, hidden Linears have a bias and the output Linear has none.
"""

from typing import Any

import jax
from flax import nnx

from byol_flax.models.resnet import CONV_INIT, BatchNormConfig


class MLP(nnx.Module):
    """``depth - 1`` blocks of Linear -> BatchNorm -> ReLU, then a bias-free output Linear."""

    def __init__(self, in_features: int, *, hidden_size: int = 4096, output_size: int = 256,
                 depth: int = 2, bn: BatchNormConfig = BatchNormConfig(), dtype: Any = None,
                 rngs: nnx.Rngs):
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1 (number of Linear layers), got {depth}")
        sizes = [in_features] + [hidden_size] * (depth - 1)
        self.hidden = nnx.List([
            nnx.Linear(i, o, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)
            for i, o in zip(sizes[:-1], sizes[1:])
        ])
        self.norms = nnx.List([bn.make(hidden_size, dtype=dtype, rngs=rngs)
                               for _ in range(depth - 1)])
        self.output = nnx.Linear(sizes[-1], output_size, use_bias=False, kernel_init=CONV_INIT,
                                 dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, norm in zip(self.hidden, self.norms):
            x = jax.nn.relu(norm(linear(x)))
        return self.output(x)
