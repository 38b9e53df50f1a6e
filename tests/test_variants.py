"""Section 5 / Appendix G and J variants: predictors, targets, Eq. 5, Table 20, LR multipliers.

Math is checked against NumPy written from the paper's formulas; the step-level tests use a
flatten + Linear encoder registered here, so every variant compiles in about a second.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from byol_flax.config import ConfigError, validate_config
from byol_flax.losses import batch_normalize, byol_loss, directional_loss, layer_normalize
from byol_flax.models import ENCODERS
from byol_flax.models.heads import MLP
from byol_flax.models.predictors import PREDICTORS, closed_form_linear_map
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicate, shard_batch
from byol_flax.train_state import create_train_state
from byol_flax.train_step import StepOptions, loss_fn, make_train_step
from tests.helpers import make_views, tiny_config

IMAGE = 8


class FlatEncoder(nnx.Module):
    """Flatten + Linear: the smallest encoder with the ResNet's interface."""

    def __init__(self, *, width_multiplier, stem, bn, dtype, rngs, features: int = 24):
        self.linear = nnx.Linear(IMAGE * IMAGE * 3, features, dtype=dtype, rngs=rngs)
        self.num_features = features

    def __call__(self, images):
        return self.linear(images.reshape(images.shape[0], -1))


@pytest.fixture(scope="module", autouse=True)
def flat_encoder():
    ENCODERS.register("test_flat")(FlatEncoder)
    yield
    ENCODERS.unregister("test_flat")


def small_config(**overrides):
    config = tiny_config(batch_size=32)
    config.model.encoder.name = "test_flat"
    config.model.projector.hidden_size = 32
    config.model.projector.output_size = 8
    config.model.predictor.hidden_size = 32
    config.optimizer.base_learning_rate = 1.0
    config.data.dir = "/data/is/not/read/here"
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def run_steps(config, steps: int = 2, seed: int = 0):
    """(state before, state after, metrics) of ``steps`` jitted steps on one device."""
    mesh = make_mesh(jax.devices()[:1])
    lr, tau = build_schedules(config, total_steps=100, warmup_steps=0)
    graphdef, state = nnx.split(create_train_state(config, lr))
    state = replicate(state, mesh)
    before = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    step = make_train_step(graphdef, mesh, StepOptions(lr, tau, loss_config=config.loss,
                                                       target_kind=config.target.kind))
    for i in range(steps):
        state, metrics = step(state, shard_batch(make_views(32, seed + i, size=IMAGE), mesh))
    return before, nnx.merge(graphdef, state), metrics


def params_of(module) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]}


# --- Closed-form predictor (Appendix J.2) ----------------------------------------------------


def test_closed_form_predictor_solves_the_least_squares_problem():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 6))
    z_target = z @ rng.normal(size=(6, 6)) + 0.1 * rng.normal(size=(64, 6))
    q_star = closed_form_linear_map(jnp.asarray(z, jnp.float32), jnp.asarray(z_target, jnp.float32),
                                    ridge=0.0)
    expected, *_ = np.linalg.lstsq(z, z_target, rcond=None)  # argmin_Q ||Z Q - Z'||_F
    np.testing.assert_allclose(q_star, expected, rtol=1e-3, atol=1e-4)
    # With a ridge r: (Z^T Z + r tr(Z^T Z)/F I)^-1 Z^T Z', defined even for a collapsed batch.
    collapsed = np.tile(z[:1], (64, 1))
    gram = collapsed.T @ collapsed
    ridge_solution = np.linalg.solve(gram + 0.1 * np.trace(gram) / 6 * np.eye(6),
                                     collapsed.T @ z_target)
    got = closed_form_linear_map(jnp.asarray(collapsed, jnp.float32),
                                 jnp.asarray(z_target, jnp.float32), ridge=0.1)
    np.testing.assert_allclose(got, ridge_solution, rtol=1e-3, atol=1e-4)


def test_closed_form_predictor_in_the_network_predicts_with_the_batch_optimum():
    config = small_config(**{"target.base_ema": 0.0, "target.schedule": "constant"})
    config.model.predictor.kind = "closed_form_linear"
    config.model.predictor.ridge = 0.0
    online = create_train_state(config, optax.constant_schedule(0.1)).online
    assert params_of(online.predictor) == {}
    z = jax.random.normal(jax.random.key(0), (32, 8))
    z_target = jax.random.normal(jax.random.key(1), (32, 8))
    expected = np.asarray(z) @ np.linalg.lstsq(np.asarray(z), np.asarray(z_target), rcond=None)[0]
    np.testing.assert_allclose(online.predict(z, z_target), expected, rtol=1e-3, atol=1e-4)


# --- Eq. 5 and the SimCLR baseline (Appendix G.4, G.5) ----------------------------------------


def cosine(a, b):
    return a @ b.T / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def numpy_infonce_eq5(p, t, t_other, alpha, beta):
    """Eq. 5 written out term by term: S(v_i, v'_i) regressed, negatives S(v_i, v_j)_{j != i}
    and S(v_i, v'_j)_j with S = cosine of phi(prediction) and psi(target)."""
    batch = len(p)
    same, other = cosine(p, t), cosine(p, t_other)
    positive = 2 / batch * sum(other[i, i] for i in range(batch))
    negative = 2 * alpha * beta / batch * sum(
        np.log(sum(np.exp(same[i, j] / alpha) for j in range(batch) if j != i)
               + sum(np.exp(other[i, j] / alpha) for j in range(batch))) for i in range(batch))
    return positive - negative


def numpy_simclr_eq10(z, z_other, alpha):
    """Eq. 10, the original SimCLR InfoNCE (without the 2 alpha factor)."""
    batch = len(z)
    same, other = cosine(z, z), cosine(z, z_other)
    return (sum(other[i, i] / alpha for i in range(batch)) / batch
            - sum(np.log(sum(np.exp(same[i, j] / alpha) for j in range(batch) if j != i)
                         + sum(np.exp(other[i, j] / alpha) for j in range(batch)))
                  for i in range(batch)) / batch)


def test_eq5_loss_matches_numpy_for_any_alpha_beta():
    rng = np.random.default_rng(1)
    p, t, t_other = (rng.normal(size=(12, 5)) for _ in range(3))
    for alpha, beta in [(0.1, 0.0), (0.3, 0.5), (1.0, 1.0), (0.01, 0.1)]:
        got = directional_loss(*(jnp.asarray(x, jnp.float32) for x in (p, t, t_other)),
                               beta=beta, temperature=alpha)
        np.testing.assert_allclose(got, -numpy_infonce_eq5(p, t, t_other, alpha, beta),
                                   rtol=1e-4, atol=1e-4)


def test_eq5_reduces_to_byol_at_beta_zero_and_to_scaled_simclr_at_beta_one():
    rng = np.random.default_rng(2)
    q1, q2, t1, t2 = (rng.normal(size=(16, 6)).astype(np.float32) for _ in range(4))
    byol = np.mean(-2 * np.diag(cosine(q1, t2))) + np.mean(-2 * np.diag(cosine(q2, t1)))
    np.testing.assert_allclose(byol_loss(q1, q2, t1, t2, small_config().loss), byol, rtol=1e-5)
    # G.5: no predictor (q = z) and no target (z' = z): beta = 1 gives Eq. 10 x 2 alpha per view.
    config = small_config(**{"loss.beta": 1.0, "loss.temperature": 0.1})
    z1, z2 = t1, t2
    expected = -2 * 0.1 * (numpy_simclr_eq10(z1, z2, 0.1) + numpy_simclr_eq10(z2, z1, 0.1))
    np.testing.assert_allclose(byol_loss(z1, z2, z1, z2, config.loss), expected, rtol=1e-4)


# --- Normalisations of Table 20 (Appendix G.6) -------------------------------------------------


def test_layernorm_and_batchnorm_normalisations_follow_g6():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 7)) * 3 + 1
    d = x.shape[1]
    mu_bn = x.mean(0)
    sigma_bn = np.sqrt((x ** 2).mean(0) - mu_bn ** 2)
    mu_ln = x.mean(1, keepdims=True)
    sigma_ln = np.linalg.norm(x - mu_ln, axis=1, keepdims=True) / np.sqrt(d)
    np.testing.assert_allclose(batch_normalize(jnp.asarray(x), eps=0.0),
                               (x - mu_bn) / (sigma_bn * np.sqrt(d)), rtol=1e-5)
    np.testing.assert_allclose(layer_normalize(jnp.asarray(x), eps=0.0),
                               (x - mu_ln) / (sigma_ln * np.sqrt(d)), rtol=1e-5)
    # The 1/sqrt(d) keeps the scale of l2: unit-norm rows (LN), unit mean squared norm (BN).
    np.testing.assert_allclose(np.linalg.norm(layer_normalize(jnp.asarray(x), 0.0), axis=1), 1,
                               rtol=1e-5)
    np.testing.assert_allclose(np.mean(np.sum(np.square(batch_normalize(jnp.asarray(x), 0.0)), 1)),
                               1, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["layernorm", "batchnorm", "none"])
def test_table20_loss_is_the_squared_error_of_normalised_vectors(normalization):
    rng = np.random.default_rng(4)
    p, t = rng.normal(size=(2, 10, 7)).astype(np.float32)
    normalise = {"layernorm": functools.partial(layer_normalize, eps=1e-5),
                 "batchnorm": functools.partial(batch_normalize, eps=1e-5),
                 "none": lambda x: x}[normalization]
    expected = np.mean(np.sum((np.asarray(normalise(p)) - np.asarray(normalise(t))) ** 2, 1)) - 2
    got = directional_loss(jnp.asarray(p), jnp.asarray(p), jnp.asarray(t),
                           normalization=normalization, eps=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# --- Target variants (Table 19) ---------------------------------------------------------------


def gradients(config, state, batch):
    online_def, params, rest = nnx.split(state.online, nnx.Param, ...)
    target_def, target_state = (None, None) if state.target is None else nnx.split(state.target)
    fn = functools.partial(loss_fn, online_def=online_def, target_def=target_def,
                           loss_config=config.loss, target_kind=config.target.kind)
    return jax.jit(jax.grad(lambda p: fn(p, rest, target_state, batch)[0]))(params)


def test_stop_gradient_target_equals_an_ema_target_that_equals_online_and_online_differs():
    """sg(theta) is xi when xi = theta (the state at step 0); theta adds the targets' gradient."""
    batch = make_views(32, size=IMAGE)
    grads = {}
    for kind in ("ema", "stop_gradient", "online"):
        config = small_config(**{"target.kind": kind})
        state = create_train_state(config, optax.constant_schedule(0.1))
        assert (state.target is None) == (kind != "ema")
        grads[kind] = jax.tree.leaves(gradients(config, state, batch))
    for a, b in zip(grads["ema"], grads["stop_gradient"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b, rtol=1e-3, atol=1e-6)
               for a, b in zip(grads["stop_gradient"], grads["online"]))


@pytest.mark.parametrize("kind", ["stop_gradient", "online"])
def test_steps_without_a_target_network(kind):
    before, after, metrics = run_steps(small_config(**{"target.kind": kind}))
    assert after.target is None and np.isfinite(float(metrics["loss"]))
    assert bool(metrics["state_is_finite"])
    assert params_of(before.online).keys() == params_of(after.online).keys()


# --- Predictor registry and LR multipliers (Table 14, Appendix J.1) ----------------------------


@pytest.mark.parametrize("kind, expected_params", [
    ("mlp", {"hidden", "norms", "output"}), ("linear", {"output"}), ("identity", set()),
    ("closed_form_linear", set())])
def test_each_shipped_predictor_trains_a_step(kind, expected_params):
    config = small_config()
    config.model.predictor.kind = kind
    before, after, metrics = run_steps(config)
    names = {key.split("'")[1] for key in params_of(after.online.predictor)}
    assert names == expected_params
    assert np.isfinite(float(metrics["loss"]))
    moved = [not np.array_equal(a, b) for a, b in zip(params_of(before.online.encoder).values(),
                                                       params_of(after.online.encoder).values())]
    assert any(moved)


def test_a_predictor_registered_from_a_test_trains_a_step():
    class ScaledLinear(nnx.Module):
        def __init__(self, features, rngs):
            self.linear = MLP(features, output_size=features, depth=1, rngs=rngs)
            self.scale = nnx.Param(jnp.asarray(0.5))

        def __call__(self, projection):
            return self.scale[...] * self.linear(projection)

    @PREDICTORS.register("test_scaled_linear")
    def build(config, *, features, bn, dtype, rngs):
        return ScaledLinear(features, rngs)

    try:
        config = small_config()
        config.model.predictor.kind = "test_scaled_linear"
        validate_config(config, num_devices=1)
        before, after, metrics = run_steps(config)
        assert isinstance(after.online.predictor, ScaledLinear)
        assert float(after.online.predictor.scale[...]) != 0.5  # it learns
        assert np.isfinite(float(metrics["loss"]))
    finally:
        PREDICTORS.unregister("test_scaled_linear")
    with pytest.raises(ConfigError, match="model.predictor.kind='test_scaled_linear'"):
        validate_config(config, num_devices=1)


def test_lr_multipliers_change_exactly_the_intended_parameters():
    """lambda = 0 freezes the predictor, mu = 0 the projector; everything else still learns."""
    moved = {}
    for name, overrides in [("lambda0", {"optimizer.predictor_lr_multiplier": 0.0}),
                            ("mu0", {"optimizer.projector_lr_multiplier": 0.0})]:
        config = small_config(**overrides)
        config.optimizer.weight_decay = 0.0
        before, after, _ = run_steps(config)
        moved[name] = {part: any(not np.array_equal(a, b) for a, b in zip(
            params_of(getattr(before.online, part)).values(),
            params_of(getattr(after.online, part)).values()))
            for part in ("encoder", "projector", "predictor")}
    assert moved["lambda0"] == {"encoder": True, "projector": True, "predictor": False}
    assert moved["mu0"] == {"encoder": True, "projector": False, "predictor": True}


def test_tau_zero_makes_the_target_the_online_network_after_a_step():
    config = small_config(**{"target.base_ema": 0.0, "target.schedule": "constant",
                             "optimizer.predictor_lr_multiplier": 10.0})
    before, after, _ = run_steps(config, steps=1)
    online, target = params_of(after.online_without_predictor()), params_of(after.target)
    assert online.keys() == target.keys()
    assert all(np.array_equal(online[k], v) for k, v in target.items())
    assert any(not np.array_equal(online[k], v) for k, v in params_of(before.target).items())


@pytest.mark.parametrize("key, value, message", [
    ("model.predictor.kind", "mlpp", "model.predictor.kind='mlpp' must be one of"),
    ("target.kind", "sg", "target.kind='sg' must be one of"),
    ("loss.normalization", "l1", "loss.normalization='l1' must be one of"),
    ("loss.temperature", 0.0, "loss.temperature=0.0 must be positive"),
    ("loss.beta", -1.0, "loss.beta=-1.0 must be >= 0"),
])
def test_bad_variant_settings_are_named(key, value, message):
    config = small_config()
    section, *rest = key.split(".")
    node = config[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_config(config, num_devices=1)

