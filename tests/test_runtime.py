"""The guard around byol_flax.runtime.xla.speed_up_tracing, which replaces a private JAX property.

These tests fail when an upgraded JAX moves or reshapes what the patch replaces, so the patch is
re-checked (and ``TESTED_JAX`` extended) before the pin in pyproject.toml is raised; and they show
that the patch changes no result, only how fast a trace is built.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src import core
from jax._src.interpreters import partial_eval

from byol_flax.runtime import xla as runtime

Tracer = partial_eval.DynamicJaxprTracer


def test_installed_jax_is_a_tested_one_and_has_the_internals_the_patch_replaces():
    assert jax.__version__.startswith(runtime.TESTED_JAX), (
        f"jax {jax.__version__} is not in TESTED_JAX {runtime.TESTED_JAX}: check that "
        "speed_up_tracing's internals are unchanged, then extend TESTED_JAX")
    assert issubclass(Tracer, core.Tracer)
    original = core.Tracer.__dict__["sharding"]
    assert isinstance(original, property) and original.fset is None
    assert Tracer.__dict__.get("sharding") in (None, runtime._FAST_SHARDING)
    assert callable(core.Tracer._error_repr) and callable(Tracer._origin_msg)
    assert runtime.tracing_patch_blocker() is None


def test_the_original_property_is_the_slow_one_and_the_patch_keeps_its_error(monkeypatch):
    """JAX's own getter builds its message with ``_origin_msg`` (the scan of the trace); the
    patched one raises the same AttributeError without it."""
    assert runtime.speed_up_tracing()
    scans = []
    original_origin = Tracer._origin_msg
    monkeypatch.setattr(Tracer, "_origin_msg",
                        lambda self: scans.append(1) or original_origin(self))
    messages = {}

    @jax.jit
    def probe(x):
        for name, getter in (("jax", core.Tracer.__dict__["sharding"].fget),
                             ("patched", Tracer.sharding.fget)):
            with pytest.raises(AttributeError) as error:
                getter(x)
            messages[name] = str(error.value)
        assert getattr(x, "sharding", None) is None and not hasattr(x, "sharding")
        return x

    probe(jnp.ones(2))
    assert len(scans) == 1  # JAX's getter only
    prefix = "The 'sharding' attribute is not available on"
    assert messages["jax"].startswith(prefix) and messages["patched"].startswith(prefix)
    assert messages["patched"] == messages["jax"][:len(messages["patched"])]


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.norm(self.hidden(x))))


def _train_twice() -> tuple[str, list[np.ndarray]]:
    """A fresh NNX step (Variable writes: BatchNorm statistics, optimizer update) traced and run
    twice; fresh functions every call, so no trace is reused from JAX's caches."""
    model = _Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, x):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    jaxpr = str(jax.make_jaxpr(step)(state, x))
    jitted = jax.jit(step)
    losses = []
    for _ in range(2):
        loss, state = jitted(state, x)
        losses.append(np.asarray(loss))
    return jaxpr, losses + [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def test_results_with_and_without_the_patch_are_identical(monkeypatch):
    assert runtime.speed_up_tracing()
    scans = []
    original_origin = Tracer._origin_msg
    monkeypatch.setattr(Tracer, "_origin_msg",
                        lambda self: scans.append(1) or original_origin(self))
    patched_jaxpr, patched = _train_twice()
    assert scans == []
    with monkeypatch.context() as unpatched:
        unpatched.delattr(Tracer, "sharding")  # the fallback: JAX's own property
        assert isinstance(Tracer.sharding, property)
        plain_jaxpr, plain = _train_twice()
    assert scans, "the step never asked a tracer for its sharding: the test compares nothing"
    assert Tracer.__dict__["sharding"] is runtime._FAST_SHARDING  # restored
    assert patched_jaxpr == plain_jaxpr
    assert len(patched) == len(plain)
    for a, b in zip(patched, plain):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def unpatched(monkeypatch):
    """JAX's own tracer class, and a process that has not logged the outcome yet."""
    if "sharding" in Tracer.__dict__:
        monkeypatch.delattr(Tracer, "sharding")
    monkeypatch.setattr(runtime, "_tracing_outcome_logged", False)
    return monkeypatch


def test_untested_jax_is_left_alone_and_logged_once(unpatched, caplog):
    unpatched.setattr(runtime.jax, "__version__", "0.99.0")
    with caplog.at_level(logging.INFO):
        assert runtime.speed_up_tracing() is False
        assert runtime.speed_up_tracing() is False
    assert "sharding" not in Tracer.__dict__
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "jax 0.99.0 is not one of the tested versions" in caplog.text


def test_moved_internals_are_left_alone(unpatched):
    unpatched.setattr(core.Tracer, "sharding", lambda self: None)  # no longer a property
    assert runtime.tracing_patch_blocker() == "jax._src.core.Tracer.sharding is not a property"
    assert runtime.speed_up_tracing() is False and "sharding" not in Tracer.__dict__


def test_tested_jax_is_patched_and_logged_once(unpatched, caplog):
    with caplog.at_level(logging.INFO):
        assert runtime.speed_up_tracing() is True
        assert runtime.speed_up_tracing() is True  # idempotent
    assert Tracer.__dict__["sharding"] is runtime._FAST_SHARDING
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "Tracing speed-up applied" in caplog.text
