"""BYOL's loss and its Section 5 / Appendix G variants.

Default: BYOL's regression loss (Algorithm 1 line 7, Appendix J.3), ``-2 cos(q(z), z')`` per
example and view, summed over the two directions. The general form is the negated InfoNCE
interpolation of Eq. 5 (Appendix G.4) with the normalisations of Appendix G.6:

    L(v -> v') = 1/B sum_i (||n(p_i) - n(t'_i)||^2 - 2)
                 + 2 alpha beta / B sum_i ln( sum_{j != i} e^{S(p_i, t_j)/alpha}
                                              + sum_j e^{S(p_i, t'_j)/alpha} )

with p = predictions of view v, t / t' = target projections of views v / v', S(a, b) =
<n(a), n(b)> and n the normalisation. For ``l2`` the first term is -2 S(p_i, t'_i), so L is
exactly -Eq. 5; beta = 0 is BYOL; beta = 1 with q = identity and the online network as target is
the SimCLR baseline of G.5 (Eq. 10 x 2 alpha). The step minimises L(v1 -> v2) + L(v2 -> v1).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


def l2_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    """n_l2(x) = x / ||x||_2 per example (``eps`` unused: the l2 form has its own floor)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def layer_normalize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """n_LN(x)_i = (x_i - mu_LN,i) / (sigma_LN,i sqrt(d)) (G.6): per example over features."""
    d = x.shape[-1]
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    sigma = jnp.sqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred / (sigma * jnp.sqrt(d))


def batch_normalize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """n_BN(x)^j_i = (x^j_i - mu^j_BN) / (sigma^j_BN sqrt(d)) (G.6): per feature over the batch,
    with no trainable scale or offset and no running averages."""
    d = x.shape[-1]
    mean = jnp.mean(x, axis=0, keepdims=True)
    variance = jnp.mean(jnp.square(x), axis=0, keepdims=True) - jnp.square(mean)
    return (x - mean) / (jnp.sqrt(jnp.maximum(variance, 0.0) + eps) * jnp.sqrt(d))


def no_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    """n_ID(x) = x."""
    return x


NORMALIZATIONS: dict[str, Callable[..., jax.Array]] = {
    "l2": l2_normalize, "layernorm": layer_normalize, "batchnorm": batch_normalize,
    "none": no_normalize,
}


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example ``-2 cos(q, z')``; the mean squared error of l2-normalised vectors minus 2."""
    return -2.0 * optax.losses.cosine_similarity(prediction.astype(jnp.float32),
                                                 target.astype(jnp.float32), epsilon=1e-24)


def _positive_term(prediction: jax.Array, target: jax.Array, normalization: str,
                   eps: float) -> jax.Array:
    """Per example ||n(p) - n(t)||^2 - 2 (for l2 computed as -2 cos, the same value)."""
    if normalization == "l2":
        return regression_loss(prediction, target)
    normalize = NORMALIZATIONS[normalization]
    return jnp.sum(jnp.square(normalize(prediction, eps) - normalize(target, eps)), axis=-1) - 2.0


def _dispersion_term(prediction: jax.Array, target_same_view: jax.Array,
                     target_other_view: jax.Array, *, temperature: float, normalization: str,
                     eps: float) -> jax.Array:
    """Per example ln(sum_{j != i} exp(S(p_i, t_j)/alpha) + sum_j exp(S(p_i, t'_j)/alpha))."""
    normalize = NORMALIZATIONS[normalization]
    p, t, t_other = (normalize(x, eps) for x in (prediction, target_same_view, target_other_view))
    highest = jax.lax.Precision.HIGHEST
    same = jnp.matmul(p, t.T, precision=highest) / temperature  # (B, B), diagonal excluded
    other = jnp.matmul(p, t_other.T, precision=highest) / temperature  # (B, B), all j
    batch = p.shape[0]
    logits = jnp.concatenate([same, other], axis=1)
    keep = jnp.concatenate([~jnp.eye(batch, dtype=bool), jnp.ones((batch, batch), bool)], axis=1)
    return jax.nn.logsumexp(logits, axis=1, where=keep)


def directional_loss(prediction: jax.Array, target_same_view: jax.Array,
                     target_other_view: jax.Array, *, beta: float = 0.0, temperature: float = 0.1,
                     normalization: str = "l2", eps: float = 1e-5) -> jax.Array:
    """L(v -> v'): the predictions of view v regress the target projections of view v'."""
    prediction, target_same_view, target_other_view = (
        x.astype(jnp.float32) for x in (prediction, target_same_view, target_other_view))
    loss = jnp.mean(_positive_term(prediction, target_other_view, normalization, eps))
    if beta:
        loss += 2.0 * temperature * beta * jnp.mean(_dispersion_term(
            prediction, target_same_view, target_other_view, temperature=temperature,
            normalization=normalization, eps=eps))
    return loss


def byol_loss(prediction_1: jax.Array, prediction_2: jax.Array, target_projection_1: jax.Array,
              target_projection_2: jax.Array, config: ConfigDict | None = None) -> jax.Array:
    """Symmetrised loss: q(z1) predicts z'2 and q(z2) predicts z'1, averaged over the batch.

    With the default ``config.loss`` (beta 0, l2) it equals ``-2 cos - 2 cos`` in [-4, 4];
    ``4 + loss`` is the ``4 - 2cos - 2cos`` form (the sum of the two normalised MSEs) that other
    implementations report. Gradients through the targets are the caller's choice (Table 19):
    the train step stops them unless ``config.target.kind == "online"``.
    """
    options = {} if config is None else dict(
        beta=config.beta, temperature=config.temperature, normalization=config.normalization,
        eps=config.normalization_eps)
    return (directional_loss(prediction_1, target_projection_1, target_projection_2, **options)
            + directional_loss(prediction_2, target_projection_2, target_projection_1, **options))
