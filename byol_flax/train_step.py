"""The BYOL update (Algorithm 1, lines 5-11) as one jitted function of explicit state.

``train_step`` works on a :class:`TrainState` in place (NNX style); :func:`make_train_step`
wraps it into ``jax.jit`` over the split state with the state buffers donated, so a training loop
carries ``nnx.State`` pytrees between steps. What the step computes with besides the state and
the batch (schedules, device augmentation, accumulation, loss and target variants) is one
:class:`StepOptions` value, built from the config once.

Gradient accumulation (Appendix G.2): with ``accumulation_steps = N`` the batch is split into N
micro-batches whose gradients are averaged before one optimizer update and one target update.
BatchNorm normalises each micro-batch with its own statistics and updates its running averages
once per micro-batch, exactly as N consecutive smaller steps would; this is the one way an
accumulated step differs from a step on the concatenated batch.
"""

import dataclasses
import functools
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from byol_flax.collapse import collapse_metrics
from byol_flax.data.augment import make_device_augment
from byol_flax.losses import byol_loss
from byol_flax.runtime.xla import speed_up_tracing
from byol_flax.schedules import Schedule, build_schedules
from byol_flax.sharding import replicated_sharding
from byol_flax.train_state import RngKey, TrainState

speed_up_tracing()  # tracing the step is quadratic without it (see the function)

Batch = dict[str, jax.Array]  # {"view1": (B, H, W, C), "view2": (B, H, W, C)[, "label": (B,)]}
Metrics = dict[str, jax.Array]
Augment = Callable[[jax.Array, Batch], Batch]  # (key, host crops) -> network inputs


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the step computes with besides the state and the batch: one value from the config,
    passed whole instead of six keywords threaded through every layer of the step.

    ``learning_rate`` and ``target_ema`` are functions of the step counter (an array in the
    state), so the jitted step is traced once for the whole run. ``augment`` runs the per-pixel
    augmentations on the accelerator with the step's key (None: the views are used as given).
    ``loss_config`` None is the paper's loss; ``target_kind`` is Table 19's choice of target.
    """

    learning_rate: optax.Schedule
    target_ema: Schedule
    augment: Augment | None = None
    accumulation_steps: int = 1
    loss_config: ConfigDict | None = None
    target_kind: str = "ema"

    @classmethod
    def from_config(cls, config: ConfigDict, total_steps: int, warmup_steps: int
                    ) -> "StepOptions":
        """The options ``config`` trains with for a run of ``total_steps``."""
        learning_rate, target_ema = build_schedules(config, total_steps=total_steps,
                                                    warmup_steps=warmup_steps)
        return cls(learning_rate, target_ema, augment=make_device_augment(config.augment),
                   accumulation_steps=config.training.accumulation_steps,
                   loss_config=config.loss, target_kind=config.target.kind)


def loss_fn(params: nnx.State, online_rest: nnx.State, target_state: nnx.State | None,
            batch: Batch, *, online_def: nnx.GraphDef, target_def: nnx.GraphDef | None,
            loss_config: ConfigDict | None = None, target_kind: str = "ema"):
    """Loss on one (micro-)batch; also returns the updated BatchNorm statistics of both networks.

    ``target_kind`` (Table 19): "ema" regresses the target network's projections (xi);
    "stop_gradient" and "online" use the online network's own projections of the views (sg(theta)
    / theta), with and without a stop-gradient; they need no target network (``target_state`` is
    None).
    """
    # copy=True: fresh Variables at this trace level, since the BatchNorm statistics are mutated.
    online = nnx.merge(online_def, params, online_rest, copy=True)
    online_1, online_2 = online(batch["view1"]), online(batch["view2"])
    if target_kind == "ema":
        target = nnx.merge(target_def, target_state, copy=True)
        target_1, target_2 = target(batch["view1"]), target(batch["view2"])
    else:
        target, target_1, target_2 = None, online_1, online_2
    target_projection_1, target_projection_2 = target_1["projection"], target_2["projection"]
    if target_kind != "online":
        target_projection_1 = jax.lax.stop_gradient(target_projection_1)
        target_projection_2 = jax.lax.stop_gradient(target_projection_2)
    prediction_1 = online.predict(online_1["projection"], target_projection_2)
    prediction_2 = online.predict(online_2["projection"], target_projection_1)
    loss = byol_loss(prediction_1, prediction_2, target_projection_1, target_projection_2,
                     loss_config)
    metrics = {
        "loss": loss,
        "loss_4_minus_2cos": 4.0 + loss,
        **collapse_metrics("representation", online_1["representation"], effective_rank=False),
        **collapse_metrics("projection", online_1["projection"]),
        **collapse_metrics("target_projection", target_projection_1),
    }
    new_target_state = None if target is None else nnx.state(target)
    # y of view 1 without gradient: the online classifier's input (official implementation).
    representation = jax.lax.stop_gradient(online_1["representation"])
    return loss, (nnx.state(online, nnx.Not(nnx.Param)), new_target_state, metrics,
                  representation)


def update_online_classifier(state: TrainState, representation: jax.Array,
                             labels: jax.Array) -> Metrics:
    """One step of the online classifier on stop-gradient representations (the official code's
    ``logits_view1`` and softmax cross-entropy). It is differentiated alone, so no gradient can
    reach the encoder, and updated by its own optimizer."""
    classifier_def, classifier_params = nnx.split(state.classifier, nnx.Param)

    def cross_entropy(params):
        logits = nnx.merge(classifier_def, params)(representation.astype(jnp.float32))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits

    (loss, logits), grads = jax.value_and_grad(cross_entropy, has_aux=True)(classifier_params)
    state.classifier_optimizer.update(state.classifier, grads)
    return {"online_classifier/loss": loss,
            "online_classifier/train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}


def train_step(state: TrainState, batch: Batch, options: StepOptions) -> Metrics:
    """One optimizer update of the online network and one EMA update of the target."""
    labels = batch.get("label")  # present when the online classifier trains
    if options.augment is not None:
        batch = options.augment(state.step_key(), batch)
    batch = {"view1": batch["view1"], "view2": batch["view2"]}
    online_def, params, online_rest = nnx.split(state.online, nnx.Param, ...)
    target_def, target_state = (None, None) if state.target is None else nnx.split(state.target)
    grad_fn = jax.grad(functools.partial(loss_fn, online_def=online_def, target_def=target_def,
                                         loss_config=options.loss_config,
                                         target_kind=options.target_kind),
                       has_aux=True)
    accumulation_steps = options.accumulation_steps

    if accumulation_steps == 1:
        grads, (online_rest, target_state, metrics, representation) = grad_fn(
            params, online_rest, target_state, batch)
    else:
        # Strided split: micro-batch i holds rows i, i+N, ..., so every device of the data axis
        # owns an equal share of every micro-batch.
        micro_batches = jax.tree.map(
            lambda x: einops.rearrange(x, "(m n) ... -> n m ...", n=accumulation_steps), batch)

        def accumulate(carry, micro_batch):
            grad_sum, online_rest, target_state = carry
            grads, (online_rest, target_state, metrics, representation) = grad_fn(
                params, online_rest, target_state, micro_batch)
            return ((jax.tree.map(jnp.add, grad_sum, grads), online_rest, target_state),
                    (metrics, representation))

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, online_rest, target_state), (metrics, representation) = jax.lax.scan(
            accumulate, (zeros, online_rest, target_state), micro_batches)
        if labels is not None:  # the strided split undone: the batch's own row order
            # (m outermost: each device keeps its rows; flattening "(n m)" would interleave
            # the devices' rows and make the partitioner gather the batch onto every device).
            representation = einops.rearrange(representation, "n m d -> (m n) d")
        grads = jax.tree.map(lambda g: g / accumulation_steps, grad_sum)
        metrics = jax.tree.map(functools.partial(jnp.mean, axis=0), metrics)

    nnx.update(state.online, online_rest)
    if state.target is not None:
        nnx.update(state.target, target_state)
    step = state.step
    tau = options.target_ema(step)
    metrics |= apply_update(state, grads, tau)
    if state.classifier is not None:
        if labels is None:
            raise ValueError("the state has an online classifier but the batch has no 'label'")
        metrics |= update_online_classifier(state, representation, labels)
    return metrics | {
        "learning_rate": options.learning_rate(step), "tau": tau,
        # Checked before every save: a finite loss can still come with a non-finite update.
        "state_is_finite": state_is_finite(state),
    }


def apply_update(state: TrainState, grads: nnx.State, tau: jax.Array) -> Metrics:
    """The optimizer's update of the online network and the target's EMA, with the gradient,
    update and parameter norms.

    On a CPU these norms and :func:`state_is_finite` cost more than the update itself
    (``benchmarks/step_monitors.py``, docs/performance.md); on an accelerator a pass over the
    state takes well under a millisecond.
    """
    params_before = jax.tree.leaves(nnx.state(state.online, nnx.Param))  # arrays: a snapshot
    state.optimizer.update(state.online, grads)
    state.update_target(tau)
    return {
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(jax.tree.map(
            jnp.subtract, jax.tree.leaves(nnx.state(state.online, nnx.Param)), params_before)),
        "param_norm": optax.tree.norm(params_before),
    }


def state_is_finite(state: TrainState) -> jax.Array:
    """Whether every array of the state (networks, statistics, optimizer moments) is finite: a
    pass over all of it, every step (its cost on a CPU: ``benchmarks/step_monitors.py``).

    Exact as a sum: x * 0 is 0 for every finite x and NaN for an infinity or a NaN, so the sum is
    0 or NaN and cannot overflow. XLA:CPU runs one such sum as a vectorised reduction, about
    twice as fast as reducing ``isfinite``'s booleans (ViT-S/16's state: 22 against 50 ms). XLA
    does not fold x * 0 for floats (tests/test_train_step.py; libtpu's compile:
    tests/test_preflight.py).
    """
    leaves = jax.tree.leaves(nnx.state(state, nnx.Not(RngKey)))
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(sum(jnp.sum(x * 0) for x in floats))


StepFn = Callable[[nnx.State, Batch], tuple[nnx.State, Metrics]]


def make_train_step(graphdef: nnx.GraphDef, mesh: Mesh, options: StepOptions) -> StepFn:
    """``jax.jit`` of :func:`train_step` over ``nnx.State``; state donated and kept replicated."""

    def step(state: nnx.State, batch: Batch) -> tuple[nnx.State, Metrics]:
        train_state = nnx.merge(graphdef, state)
        metrics = train_step(train_state, batch, options)
        return nnx.state(train_state), metrics

    return jax.jit(step, donate_argnums=0, out_shardings=replicated_sharding(mesh))
