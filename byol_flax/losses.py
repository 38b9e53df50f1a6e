"""BYOL's regression loss (Algorithm 1 line 7, Appendix J.3)."""

import jax
import jax.numpy as jnp
import optax


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example ``-2 cos(q, z')``; the mean squared error of l2-normalised vectors minus 2."""
    return -2.0 * optax.losses.cosine_similarity(prediction.astype(jnp.float32),
                                                 target.astype(jnp.float32), epsilon=1e-24)


def byol_loss(prediction_1: jax.Array, prediction_2: jax.Array, target_projection_1: jax.Array,
              target_projection_2: jax.Array) -> jax.Array:
    """Symmetrised loss: q(z1) predicts z'2 and q(z2) predicts z'1, averaged over the batch.

    Equals ``-2 cos - 2 cos`` in [-4, 4]; ``4 + loss`` is the ``4 - 2cos - 2cos`` form (the sum of
    the two normalised MSEs) that other implementations report. No gradient reaches the target.
    """
    target_projection_1 = jax.lax.stop_gradient(target_projection_1)
    target_projection_2 = jax.lax.stop_gradient(target_projection_2)
    return (jnp.mean(regression_loss(prediction_1, target_projection_2))
            + jnp.mean(regression_loss(prediction_2, target_projection_1)))
