"""LARS, its exclusions (Appendix A) and the learning-rate multipliers (Appendix J.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from byol_flax.config import base_config
from byol_flax.models import build_online_network
from byol_flax.optim import build_optimizer, decay_and_adaptation_mask


def leaves_with_names(tree):
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(key_path)] = leaf
    return out


@pytest.fixture
def online(config):
    return build_online_network(config.model, rngs=nnx.Rngs(0))


def test_mask_selects_exactly_biases_and_batchnorm_parameters(online):
    params = nnx.state(online, nnx.Param)
    mask = leaves_with_names(decay_and_adaptation_mask(online)(params))
    shapes = leaves_with_names(params)
    excluded = {name for name, keep in mask.items() if not keep}
    # In a ResNet + MLP, the 1-D parameters are exactly the biases and the BN scales/offsets;
    # every kernel (conv or linear) is at least 2-D and keeps decay and adaptation.
    assert excluded == {name for name, leaf in shapes.items() if leaf.ndim == 1}
    assert all("bias" in n or "norm" in n for n in excluded)
    assert any("norm" in n and "scale" in n for n in excluded)
    assert any("hidden" in n and "bias" in n for n in excluded)  # Linear biases too
    assert all(not keep for n, keep in mask.items() if "stem_norm" in n)
    assert all(keep for n, keep in mask.items() if n.endswith("kernel']"))


def reference_lars(params, grads_per_step, lrs, *, wd, eta, momentum, mask):
    """The official BYOL optimizer (Appendix J.1) in NumPy: decay -> trust ratio -> momentum ->
    LR."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for k, p in params.items():
            g = np.array(grads[k], np.float64)
            if mask[k]:
                g = g + wd * p
                p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
                if p_norm > 0 and g_norm > 0:
                    g = g * eta * p_norm / g_norm
            mu[k] = momentum * mu[k] + g
            params[k] = p - lr * mu[k]
    return params


def test_optimizer_matches_the_official_lars_with_changing_learning_rate(online):
    config = base_config().optimizer
    config.weight_decay = 1e-2  # large enough to matter in a few steps
    lrs = [0.5, 1.0, 2.0]
    schedule = lambda step: jnp.asarray(lrs)[step]
    optimizer = nnx.Optimizer(online, build_optimizer(config, online, schedule), wrt=nnx.Param)
    params0 = leaves_with_names(nnx.state(online, nnx.Param))
    mask = leaves_with_names(decay_and_adaptation_mask(online)(nnx.state(online, nnx.Param)))
    rng = np.random.default_rng(0)
    grads_per_step = []
    for _ in lrs:
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                             nnx.state(online, nnx.Param))
        grads_per_step.append(leaves_with_names(grads))
        optimizer.update(online, grads)
    expected = reference_lars(params0, grads_per_step, lrs, wd=1e-2, eta=1e-3, momentum=0.9,
                              mask=mask)
    got = leaves_with_names(nnx.state(online, nnx.Param))
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=1e-6, err_msg=name)
    # optax.lars scales by the LR before its momentum trace, so it cannot match this reference.
    assert int(optimizer.step[...]) == 3


def test_excluded_leaves_get_no_weight_decay(online):
    """With zero gradients only weight decay moves parameters: kernels move, biases/BN don't."""
    config = base_config().optimizer
    tx = build_optimizer(config, online, optax.constant_schedule(1.0))
    optimizer = nnx.Optimizer(online, tx, wrt=nnx.Param)
    before = leaves_with_names(nnx.state(online, nnx.Param))
    optimizer.update(online, jax.tree.map(jnp.zeros_like, nnx.state(online, nnx.Param)))
    after = leaves_with_names(nnx.state(online, nnx.Param))
    for name, value in before.items():
        moved = not np.array_equal(value, after[name])
        assert moved == (value.ndim > 1 and bool(jnp.any(value != 0))), name


def test_learning_rate_multipliers_scale_only_their_module(online):
    def first_update(predictor_mult, projector_mult):
        config = base_config().optimizer
        config.predictor_lr_multiplier = predictor_mult
        config.projector_lr_multiplier = projector_mult
        model = nnx.clone(online)
        tx = build_optimizer(config, model, optax.constant_schedule(0.1))
        state = nnx.state(model, nnx.Param)
        grads = jax.tree.map(lambda p: jnp.ones_like(p), state)
        updates, _ = tx.update(grads, tx.init(state), state)
        return updates

    base, scaled = first_update(1.0, 1.0), first_update(10.0, 0.5)
    for module, factor in [("predictor", 10.0), ("projector", 0.5), ("encoder", 1.0)]:
        for a, b in zip(jax.tree.leaves(base[module]), jax.tree.leaves(scaled[module])):
            np.testing.assert_allclose(b, factor * a, rtol=1e-6)


def test_optimizer_state_covers_only_parameters(online):
    """BatchNorm statistics are never optimized: the momentum mirrors the Params exactly."""
    tx = build_optimizer(base_config().optimizer, online, optax.constant_schedule(0.1))
    optimizer = nnx.Optimizer(online, tx, wrt=nnx.Param)
    params = nnx.state(online, nnx.Param)
    momentum = [s for s in jax.tree.leaves(optimizer.opt_state,
                                           is_leaf=lambda x: isinstance(x, optax.TraceState))
                if isinstance(s, optax.TraceState)]
    assert len(momentum) == 1
    shapes = lambda tree: {k: v.shape for k, v in leaves_with_names(tree).items()}
    assert shapes(momentum[0].trace) == shapes(params)
    assert len(jax.tree.leaves(nnx.state(online, nnx.BatchStat))) > 0


def test_optimizer_state_has_one_structure_whatever_the_multipliers(online):
    """Changing lambda or mu on resume must not change the checkpoint layout (resume under
    change)."""
    def state_paths(predictor_mult):
        config = base_config().optimizer
        config.predictor_lr_multiplier = predictor_mult
        tx = build_optimizer(config, online, optax.constant_schedule(0.1))
        optimizer = nnx.Optimizer(nnx.clone(online), tx, wrt=nnx.Param)
        return [jax.tree_util.keystr(k) for k, _ in
                jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(optimizer)))[0]]

    assert state_paths(1.0) == state_paths(10.0)
