"""The jitted BYOL step: learning, EMA target, target BatchNorm, retracing, accumulation,
sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from byol_flax.data.augment import make_device_augment
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicate, shard_batch
from byol_flax.train_state import TrainState, create_train_state
from byol_flax.train_step import StepOptions, loss_fn, make_train_step, state_is_finite
from tests.helpers import make_views, tiny_config

TOTAL_STEPS, WARMUP_STEPS = 100, 0


def setup(config, devices=None, accumulation_steps=1, augment=None):
    """A replicated initial state and the jitted step on a mesh over ``devices``."""
    mesh = make_mesh(devices if devices is not None else jax.devices()[:1])
    lr, tau = build_schedules(config, total_steps=TOTAL_STEPS, warmup_steps=WARMUP_STEPS)
    graphdef, state = nnx.split(create_train_state(config, lr))
    step = make_train_step(graphdef, mesh, StepOptions(lr, tau, augment=augment,
                                                       accumulation_steps=accumulation_steps))
    return graphdef, replicate(state, mesh), step, mesh


def as_numpy(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(config):
    config.optimizer.base_learning_rate = 2.0
    _, state, step, mesh = setup(config)
    batch = shard_batch(make_views(16), mesh)
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and bool(metrics["state_is_finite"])
    assert losses[-1] < losses[0] - 0.1, losses


def test_state_is_finite_flags_a_non_finite_update(config):
    config.optimizer.base_learning_rate = 1e38  # overflows the first real update
    _, state, step, mesh = setup(config)
    flags = []
    for seed in range(3):
        state, metrics = step(state, shard_batch(make_views(16, seed), mesh))
        flags.append(bool(metrics["state_is_finite"]))
    assert not all(flags)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, None])
def test_state_is_finite_is_exact_for_one_element_of_any_array(config, value):
    """One non-finite element anywhere (an optimizer moment, the target, a BatchNorm statistic)
    makes it False; the largest finite float32s keep it True (the check may not overflow)."""
    graphdef, state = nnx.split(create_train_state(config, build_schedules(
        config, total_steps=TOTAL_STEPS, warmup_steps=WARMUP_STEPS)[0]))
    check = jax.jit(lambda state: state_is_finite(nnx.merge(graphdef, state)))
    big = jax.tree.map(lambda x: jnp.full_like(x, jnp.finfo(x.dtype).max)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    assert bool(check(big))
    leaves, treedef = jax.tree.flatten(state)
    floating = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating)]
    if value is None:
        assert bool(check(state))
        return
    for index in (floating[0], floating[len(floating) // 2], floating[-1]):
        spoiled = list(leaves)
        spoiled[index] = spoiled[index].ravel().at[-1].set(value).reshape(spoiled[index].shape)
        assert not bool(check(jax.tree.unflatten(treedef, spoiled))), index


def test_jitted_step_traces_once_for_all_steps(config):
    _, state, step, mesh = setup(config)
    taus = []
    for seed in range(3):
        state, metrics = step(state, shard_batch(make_views(16, seed), mesh))
        taus.append(float(metrics["tau"]))
    assert step._cache_size() == 1
    assert taus[0] < taus[1] < taus[2]  # tau really changed between calls (cosine schedule)


def test_target_is_the_ema_of_online_parameters(config):
    graphdef, state, step, mesh = setup(config)
    before = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    state, metrics = step(state, shard_batch(make_views(16), mesh))
    after = nnx.merge(graphdef, state)
    tau = float(metrics["tau"])
    assert tau == pytest.approx(config.target.base_ema)  # tau_0 = tau_base
    old_target = as_numpy(nnx.state(before.target, nnx.Param))
    new_online = as_numpy(nnx.state(after.online_without_predictor(), nnx.Param))
    new_target = as_numpy(nnx.state(after.target, nnx.Param))
    for name, value in new_target.items():
        np.testing.assert_allclose(value, tau * old_target[name] + (1 - tau) * new_online[name],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    assert int(after.step) == 1


def test_tau_zero_makes_the_target_a_hard_copy(config):
    """Appendix J.1: tau = 0 over the whole run; the target equals the online network."""
    config.target.base_ema = 0.0
    config.target.schedule = "constant"
    graphdef, state, step, mesh = setup(config)
    for seed in range(2):
        state, _ = step(state, shard_batch(make_views(16, seed), mesh))
    after = nnx.merge(graphdef, state)
    online = as_numpy(nnx.state(after.online_without_predictor(), nnx.Param))
    target = as_numpy(nnx.state(after.target, nnx.Param))
    assert online.keys() == target.keys()
    for name in online:
        np.testing.assert_array_equal(online[name], target[name], err_msg=name)


def test_target_batchnorm_uses_batch_statistics_and_keeps_its_own_averages(config):
    graphdef, state, step, mesh = setup(config)
    state, _ = step(state, shard_batch(make_views(16, 0), mesh))  # online and target now differ
    batch = make_views(16, 1)

    # 1. Training mode: the target's running statistics do not affect the loss.
    ts = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    online_def, params, online_rest = nnx.split(ts.online, nnx.Param, ...)
    target_def, target_state = nnx.split(ts.target)
    loss = lambda target_state: loss_fn(params, online_rest, target_state, batch,
                                        online_def=online_def, target_def=target_def)[0]
    _, stats, rest = nnx.split(ts.target, nnx.BatchStat, ...)
    garbage = nnx.merge_state(jax.tree.map(lambda x: jnp.full_like(x, 100.0), stats), rest)
    np.testing.assert_allclose(loss(target_state), loss(garbage), rtol=1e-6)

    # 2. Its running averages come from its own forward passes on view1 then view2.
    expected = nnx.merge(graphdef, jax.tree.map(jnp.copy, state)).target
    expected(jnp.asarray(batch["view1"]))
    expected(jnp.asarray(batch["view2"]))
    state, _ = step(state, shard_batch(batch, mesh))
    got = as_numpy(nnx.state(nnx.merge(graphdef, state).target, nnx.BatchStat))
    want = as_numpy(nnx.state(expected, nnx.BatchStat))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-5, err_msg=name)
    online_stats = as_numpy(nnx.state(nnx.merge(graphdef, state).online_without_predictor(),
                                      nnx.BatchStat))
    assert any(not np.allclose(online_stats[n], got[n]) for n in got)


def test_accumulation_of_identical_micro_batches_equals_one_large_step():
    """Appendix G.2 accumulation over N = 4 micro-batches vs one step on the concatenated batch.

    With four identical micro-batches BatchNorm sees the same statistics either way, so
    parameters, target and optimizer state must agree. What differs by design: the running
    BatchNorm averages, updated once per micro-batch (4 momentum steps instead of 1).
    """
    n, micro = 4, 8
    config = tiny_config(batch_size=n * micro)
    views = make_views(micro)
    # The step splits micro-batches with a stride (row i goes to micro-batch i mod N), so
    # repeating each row N times makes every micro-batch equal to ``views``.
    batch = {k: np.repeat(v, n, axis=0) for k, v in views.items()}

    graphdef, state_one, step_one, mesh = setup(config)
    _, state_acc, step_acc, _ = setup(config, accumulation_steps=n)
    initial_stats = as_numpy(nnx.state(nnx.merge(graphdef, state_one).online, nnx.BatchStat))
    state_one, metrics_one = step_one(state_one, shard_batch(batch, mesh))
    state_acc, metrics_acc = step_acc(state_acc, shard_batch(batch, mesh))
    np.testing.assert_allclose(metrics_acc["loss"], metrics_one["loss"], rtol=1e-5)

    one, acc = nnx.merge(graphdef, state_one), nnx.merge(graphdef, state_acc)
    for part in ("online", "target", "optimizer"):
        a = as_numpy(nnx.state(getattr(one, part), nnx.Not(nnx.BatchStat)))
        b = as_numpy(nnx.state(getattr(acc, part), nnx.Not(nnx.BatchStat)))
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{part}{name}")

    # Each micro-batch applies the single step's two running-mean updates (view1, view2) again:
    # R <- d^2 R + c with c = r_one - d^2 r0, so after N = 4 micro-batches
    # R = d^8 r0 + c (1 + d^2 + d^4 + d^6).
    key = "['encoder']['stem_norm']['mean'].value"
    r0 = initial_stats[key]
    r_one = as_numpy(nnx.state(one.online, nnx.BatchStat))[key]
    r_acc = as_numpy(nnx.state(acc.online, nnx.BatchStat))[key]
    d = config.model.batchnorm.decay
    c = r_one - d**2 * r0
    np.testing.assert_allclose(r_acc, d**8 * r0 + c * (1 + d**2 + d**4 + d**6), rtol=1e-4,
                               atol=1e-6)
    assert not np.allclose(r_one, r_acc)


def test_sharded_step_on_8_devices_equals_single_device_step():
    """Same new state on 1 and 8 devices, on-device augmentations (per-example keys) included."""
    assert jax.device_count() >= 8, "conftest.py sets --xla_force_host_platform_device_count=8"
    config = tiny_config(batch_size=16)
    to_uint8 = lambda views: {k: np.clip(v * 40 + 128, 0, 255).astype(np.uint8)
                              for k, v in views.items()}
    batches = [to_uint8(make_views(16, seed)) for seed in range(2)]
    finals = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        _, state, step, mesh = setup(config, devices=devices,
                                     augment=make_device_augment(config.augment))
        for views in batches:
            sharded = shard_batch(views, mesh)
            assert len(sharded["view1"].sharding.device_set) == len(devices)
            state, metrics = step(state, sharded)
        leaf = jax.tree.leaves(state)[0]
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
        finals.append((as_numpy(state), float(metrics["loss"])))
    (single, loss_1), (sharded, loss_8) = finals
    assert loss_1 == pytest.approx(loss_8, rel=1e-5)
    assert single.keys() == sharded.keys()
    for name in single:
        np.testing.assert_allclose(sharded[name], single[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_step_options_carry_the_configs_schedules_and_variants(config):
    config.training.accumulation_steps = 2
    config.target.kind = "stop_gradient"
    options = StepOptions.from_config(config, TOTAL_STEPS, warmup_steps=10)
    lr, tau = build_schedules(config, total_steps=TOTAL_STEPS, warmup_steps=10)
    for step in (0, 5, 10, 60, TOTAL_STEPS):
        assert float(options.learning_rate(step)) == float(lr(step))
        assert float(options.target_ema(step)) == float(tau(step))
    assert (options.accumulation_steps, options.target_kind) == (2, "stop_gradient")
    assert options.loss_config is config.loss and options.augment is not None
    with pytest.raises(AttributeError):  # frozen: one value for the whole run
        options.accumulation_steps = 1


def test_train_state_holds_online_target_optimizer_and_step(config):
    lr, _ = build_schedules(config, total_steps=10, warmup_steps=1)
    state = create_train_state(config, lr)
    assert isinstance(state, TrainState)
    assert int(state.step) == 0
    assert state.online.predictor is not None and state.target.predictor is None
