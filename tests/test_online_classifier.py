"""The official implementation's online classifier: a linear layer trained with the labels on the
stop-gradient representation during pre-training, with its own optimizer, outside the target."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from byol_flax.cloud import tpu_compile
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicate, shard_batch
from byol_flax.train import plan_label_users
from byol_flax.train_state import create_train_state
from byol_flax.train_step import StepOptions, loss_fn, make_train_step
from tests.helpers import make_views

NUM_CLASSES = 4
STEPS = 20


def labelled_views(batch_size: int, seed: int = 0) -> dict:
    views = make_views(batch_size, seed)
    # Labels the images carry: the sign pattern of two pixels' means, learnable by a linear layer.
    mean = views["view1"].mean(axis=(1, 2))
    views["label"] = ((mean[:, 0] > 0).astype(np.int32) * 2 + (mean[:, 1] > 0)).astype(np.int32)
    return views


def run_steps(config, num_classes: int, steps: int, accumulation_steps: int = 1):
    mesh = make_mesh(jax.devices()[:1])
    lr, tau = build_schedules(config, total_steps=100, warmup_steps=0)
    graphdef, state = nnx.split(create_train_state(config, lr, num_classes=num_classes))
    step = make_train_step(graphdef, mesh, StepOptions(lr, tau,
                                                       accumulation_steps=accumulation_steps))
    state = replicate(state, mesh)
    batch = labelled_views(16)
    if not num_classes:
        batch.pop("label")
    history = []
    for _ in range(steps):
        state, metrics = step(state, shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return nnx.merge(graphdef, state), history


def test_the_classifier_sends_no_gradient_into_the_online_or_target_network(config):
    """Steps with and without the classifier leave the same online and target networks, while
    the classifier itself learns."""
    config.optimizer.base_learning_rate = 2.0
    with_classifier, history = run_steps(config, NUM_CLASSES, steps=STEPS)
    without, history_without = run_steps(config, 0, steps=STEPS)
    assert without.classifier is None and with_classifier.classifier is not None
    for module in ("online", "target"):
        got = jax.tree.leaves(nnx.state(getattr(with_classifier, module)))
        expected = jax.tree.leaves(nnx.state(getattr(without, module)))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=module)
    np.testing.assert_allclose([h["loss"] for h in history],
                               [h["loss"] for h in history_without], rtol=1e-6)
    # The BYOL optimizer's state does not hold the classifier; the classifier has its own.
    assert len(jax.tree.leaves(nnx.state(with_classifier.optimizer))) == len(
        jax.tree.leaves(nnx.state(without.optimizer)))
    assert int(with_classifier.classifier_optimizer.step[...]) == STEPS
    assert "online_classifier/loss" not in history_without[0]
    assert_learns(history)


def assert_learns(history) -> None:
    losses = [float(h["online_classifier/loss"]) for h in history]
    # LARS (trust coefficient 1e-3) moves the layer slowly but steadily on a fixed batch.
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


def test_the_classifier_loss_has_zero_gradient_with_respect_to_the_online_parameters(config):
    """The representation handed to the classifier is stop-gradient: a loss on it cannot move
    the encoder (the BYOL loss through the same function does)."""
    state = create_train_state(config, optax.constant_schedule(0.1), num_classes=NUM_CLASSES)
    online_def, params, rest = nnx.split(state.online, nnx.Param, ...)
    target_def, target_state = nnx.split(state.target)
    batch = labelled_views(8)
    classifier = state.classifier

    def classifier_loss(p):
        _, (_, _, _, representation) = loss_fn(
            p, rest, target_state, {"view1": batch["view1"], "view2": batch["view2"]},
            online_def=online_def, target_def=target_def)
        logits = classifier(representation)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    # Compiled (one program each) rather than op by op: the same gradients, a fraction of the time.
    grads = jax.jit(jax.grad(classifier_loss))(params)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))
    byol_grads = jax.jit(jax.grad(lambda p: loss_fn(p, rest, target_state, batch,
                                                    online_def=online_def,
                                                    target_def=target_def)[0]))(params)
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(byol_grads))


def test_the_classifier_learns_with_gradient_accumulation(config):
    """Micro-batch representations and labels are split and re-joined row for row."""
    config.optimizer.base_learning_rate = 2.0
    _, history = run_steps(config, NUM_CLASSES, steps=STEPS, accumulation_steps=2)
    assert_learns(history)


def test_with_accumulation_on_8_devices_each_keeps_its_rows_for_the_classifier(config):
    """The micro-batches' representations are joined back in the batch's own row order, which
    keeps each device's rows on it: the compiled step gathers nothing (it gathered the whole
    batch's representations onto every device when the rows were interleaved)."""
    mesh = make_mesh(jax.devices()[:8])
    lr, tau = build_schedules(config, total_steps=100, warmup_steps=0)
    graphdef, state = nnx.split(create_train_state(config, lr, num_classes=NUM_CLASSES))
    step = make_train_step(graphdef, mesh, StepOptions(lr, tau, accumulation_steps=2))
    hlo = step.lower(replicate(state, mesh), shard_batch(labelled_views(16), mesh)).compile()
    collectives, _ = tpu_compile.read_hlo(hlo.as_text())
    assert "all-reduce" in collectives and "all-gather" not in collectives, collectives


def test_without_labels_the_classifier_and_label_monitors_are_switched_off_in_one_line(
        config, caplog):
    config.data.dir = "/data/my_unlabeled_images"
    with caplog.at_level(logging.WARNING):
        planned = plan_label_users(config, num_classes=0)
    assert planned.model.online_classifier is False and planned.monitor.evaluators == ()
    assert config.model.online_classifier is True  # the caller's config is not modified
    assert config.monitor.evaluators == ("knn", "online_classifier")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "online classifier" in warnings[0] and "knn monitor" in warnings[0]
    assert "/data/my_unlabeled_images has no labels" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        labelled = plan_label_users(config, num_classes=10)
    assert labelled.model.online_classifier and labelled.monitor.evaluators == (
        "knn", "online_classifier")
    assert not caplog.records

    config.model.online_classifier = False
    without = plan_label_users(config, num_classes=10)
    assert without.monitor.evaluators == ("knn",)
