"""The loss of Algorithm 1 line 7 / Appendix J.3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from byol_flax.losses import byol_loss, regression_loss
from byol_flax.models import build_online_network, target_from_online
from byol_flax.train_step import loss_fn
from tests.helpers import make_views


def numpy_reference(q1, q2, z1_target, z2_target):
    """J.3 written out: -2 <q, z'> / (|q| |z'|), q(z1) against z'2 and q(z2) against z'1."""
    def cos(a, b):
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.mean(-2 * cos(q1, z2_target)) + np.mean(-2 * cos(q2, z1_target))


def test_loss_matches_numpy_reference_and_is_symmetric():
    rng = np.random.default_rng(0)
    q1, q2, t1, t2 = (rng.normal(size=(32, 256)).astype(np.float32) for _ in range(4))
    loss = byol_loss(q1, q2, t1, t2)
    np.testing.assert_allclose(loss, numpy_reference(q1, q2, t1, t2), rtol=1e-5)
    # Swapping the two views (t <-> t') leaves the loss unchanged.
    np.testing.assert_allclose(byol_loss(q2, q1, t2, t1), loss, rtol=1e-6)


def test_regression_loss_bounds_and_scale_invariance():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    np.testing.assert_allclose(regression_loss(x, 3.0 * x), -2.0, rtol=1e-6)
    np.testing.assert_allclose(regression_loss(x, -x), 2.0, rtol=1e-6)
    # 2 - 2cos is the MSE of the l2-normalised vectors (Eq. 2).
    y = jax.random.normal(jax.random.key(1), (8, 16))
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_allclose(2.0 + regression_loss(x, y),
                               jnp.sum((unit(x) - unit(y)) ** 2, -1), rtol=1e-5)


def test_no_gradient_reaches_the_target(config):
    """d loss / d xi is exactly zero in the step's own loss function (stop-gradient on z')."""
    online = build_online_network(config.model, rngs=nnx.Rngs(0))
    online_def, params, online_rest = nnx.split(online, nnx.Param, ...)
    target_def, target_params, target_rest = nnx.split(target_from_online(online), nnx.Param, ...)

    def loss_of_target_params(target_params):
        target_state = nnx.merge_state(target_params, target_rest)
        loss, _ = loss_fn(params, online_rest, target_state, make_views(8),
                          online_def=online_def, target_def=target_def)
        return loss

    grads = jax.jit(jax.grad(loss_of_target_params))(target_params)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(target_params))
    assert all(bool(jnp.all(g == 0)) for g in leaves)
    # ... while the online parameters do receive gradient through the same function.
    online_grads = jax.jit(jax.grad(lambda p: loss_fn(p, online_rest,
                                              nnx.merge_state(target_params, target_rest),
                                              make_views(8), online_def=online_def,
                                              target_def=target_def)[0]))(params)
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(online_grads))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_loss_is_computed_in_float32(dtype):
    x = jnp.ones((4, 8), dtype)
    assert byol_loss(x, x, x, x).dtype == jnp.float32
