"""Predictor variants q, chosen by name with ``config.model.predictor.kind``.

A variant is a constructor registered in :data:`PREDICTORS`; it receives the
``config.model.predictor`` section and returns an ``nnx.Module`` mapping projections (B, F) to
predictions (B, F). Shipped:

* ``mlp`` (default): Appendix A's MLP, ``depth`` Linear layers (Table 14), hidden size
  ``hidden_size``;
* ``linear``: one bias-free Linear layer (Table 14's depth 1);
* ``identity``: no predictor, q(z) = z (Table 19's rows without a predictor, the SimCLR baseline);
* ``closed_form_linear`` (Appendix J.2): no parameters; the least-squares optimal linear map from
  the batch's online projections Z to the target projections Z', recomputed in every step.

A variant that is fitted to the batch instead of learned subclasses :class:`BatchFittedPredictor`
and is called with the target projections as well (see :func:`apply_predictor`).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from byol_flax.models.heads import MLP
from byol_flax.models.resnet import BatchNormConfig
from byol_flax.runtime.registry import Registry

# (predictor config section, *, features, bn, dtype, rngs) -> nnx.Module
PREDICTORS: Registry = Registry("predictor")


class BatchFittedPredictor(nnx.Module):
    """A predictor computed from the batch's (projection, target projection) pairs."""

    def __call__(self, projection: jax.Array, target_projection: jax.Array) -> jax.Array:
        raise NotImplementedError


def apply_predictor(predictor: nnx.Module, projection: jax.Array,
                    target_projection: jax.Array) -> jax.Array:
    """q(z): learned predictors see the projection only, batch-fitted ones the targets too."""
    if isinstance(predictor, BatchFittedPredictor):
        return predictor(projection, target_projection)
    return predictor(projection)


class IdentityPredictor(nnx.Module):
    """No predictor: the projection is its own prediction."""

    def __call__(self, projection: jax.Array) -> jax.Array:
        return projection


def closed_form_linear_map(projection: jax.Array, target_projection: jax.Array, *,
                           ridge: float) -> jax.Array:
    """Q* = (Z^T Z + r I)^-1 Z^T Z', r = ridge x tr(Z^T Z) / F (Appendix J.2 with a ridge term).

    The ridge is relative to the mean eigenvalue of Z^T Z, so it means the same at any scale of
    the projections; it keeps the solve defined when the batch's projections are (nearly)
    collapsed or fewer than F. ``ridge = 0`` is the paper's exact least-squares solution.
    Computed in float32 at full matmul precision (TPUs default to bfloat16 passes).
    """
    z = projection.astype(jnp.float32)
    z_target = target_projection.astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(z.T, z, precision=highest)
    features = gram.shape[0]
    regulariser = ridge * jnp.trace(gram) / features
    return jax.scipy.linalg.solve(gram + regulariser * jnp.eye(features, dtype=gram.dtype),
                                  jnp.matmul(z.T, z_target, precision=highest), assume_a="pos")


class ClosedFormLinearPredictor(BatchFittedPredictor):
    """Appendix J.2: the optimal linear predictor of the batch, q*(z) = z Q*.

    Q* is treated like a predictor's parameters: it is not differentiated through (stop
    gradient), so the online network is trained to move towards the targets as seen through the
    current optimal predictor, as it is with a learned predictor.
    """

    def __init__(self, ridge: float):
        self.ridge = ridge

    def __call__(self, projection: jax.Array, target_projection: jax.Array) -> jax.Array:
        q_star = jax.lax.stop_gradient(closed_form_linear_map(
            projection, jax.lax.stop_gradient(target_projection), ridge=self.ridge))
        return jnp.matmul(projection.astype(jnp.float32), q_star,
                          precision=jax.lax.Precision.HIGHEST)


@PREDICTORS.register("mlp")
def mlp_predictor(config: ConfigDict, *, features: int, bn: BatchNormConfig, dtype: Any,
                  rngs: nnx.Rngs) -> nnx.Module:
    return MLP(features, hidden_size=config.hidden_size, output_size=features, depth=config.depth,
               bn=bn, dtype=dtype, rngs=rngs)


@PREDICTORS.register("linear")
def linear_predictor(config: ConfigDict, *, features: int, bn: BatchNormConfig, dtype: Any,
                     rngs: nnx.Rngs) -> nnx.Module:
    return MLP(features, output_size=features, depth=1, bn=bn, dtype=dtype, rngs=rngs)


@PREDICTORS.register("identity")
def identity_predictor(config: ConfigDict, *, features: int, bn: BatchNormConfig, dtype: Any,
                       rngs: nnx.Rngs) -> nnx.Module:
    return IdentityPredictor()


@PREDICTORS.register("closed_form_linear")
def closed_form_linear_predictor(config: ConfigDict, *, features: int, bn: BatchNormConfig,
                                 dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    return ClosedFormLinearPredictor(ridge=config.ridge)


def build_predictor(config: ConfigDict, *, features: int, bn: BatchNormConfig, dtype: Any,
                    rngs: nnx.Rngs) -> nnx.Module:
    """The predictor named by ``config.kind`` (``config`` = ``config.model.predictor``)."""
    return PREDICTORS.get(config.kind)(config, features=features, bn=bn, dtype=dtype, rngs=rngs)
