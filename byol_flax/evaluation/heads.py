"""Linear evaluation's whole LR grid (Appendix D.1) trained in one pass: one linear head per grid
point on the same frozen features.

The features do not depend on the learning rate, so one frozen-encoder forward per augmented
batch feeds every head; the heads (stacked kernels ``[heads, dim, classes]``) and their optimizer
states are updated by ``jax.vmap`` of the single-head update inside one jitted step. Head ``i``
sees exactly the batches, augmentation keys and updates a single-LR run of its LR sees, so each
head is the classifier the per-LR protocol would train. Both loops checkpoint through
:class:`~byol_flax.evaluation.resumable.UnitCheckpoints`.
"""

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from byol_flax.data.augment import normalize, to_unit_float
from byol_flax.evaluation.classifier import (
    DeviceAugment,
    SgdSpec,
    classification_loss,
    steps_per_epoch,
)
from byol_flax.evaluation.resumable import UnitCheckpoints
from byol_flax.sharding import replicate, shard_batch

Head = dict[str, jax.Array]  # {"kernel": [dim, classes], "bias": [classes]}
# (mean, 1 / std) per feature: what ``linear.feature_norm="batchnorm"`` subtracts and multiplies
# by before the heads (byol_flax.evaluation.linear.feature_standardizer).
Standardizer = tuple[jax.Array, jax.Array]


def zero_heads(count: int, dim: int, num_classes: int) -> Head:
    """``count`` zero-initialised heads, stacked (the per-LR protocol's zero-initialised head)."""
    return {"kernel": jnp.zeros((count, dim, num_classes)), "bias": jnp.zeros((count, num_classes))}


def _update_heads(heads: Head, opt_state: optax.OptState, features: jax.Array,
                  labels: jax.Array, learning_rates: jax.Array, spec: SgdSpec,
                  tclip: tuple[float, float]) -> tuple[Head, optax.OptState, jax.Array]:
    """One SGD step of every head on the same features (vmapped single-head update)."""

    def one(head, state, learning_rate):
        def loss(head):
            return classification_loss(features @ head["kernel"] + head["bias"], labels,
                                       tclip_alpha=tclip[0], tclip_beta=tclip[1])

        value, grads = jax.value_and_grad(loss)(head)
        updates, state = spec.build(learning_rate, 0.0).update(grads, state, head)
        return optax.apply_updates(head, updates), state, value

    return jax.vmap(one)(heads, opt_state, learning_rates)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "augment", "tclip"),
                   donate_argnames=("heads", "opt_state"))
def _heads_step(heads: Head, opt_state: optax.OptState, encoder_state: nnx.State,
                images: jax.Array, labels: jax.Array, key: jax.Array, learning_rates: jax.Array,
                standardizer: Standardizer | None, *, graphdef: nnx.GraphDef, spec: SgdSpec,
                augment: DeviceAugment | None, tclip: tuple[float, float]):
    inputs = augment(key, images) if augment else normalize(to_unit_float(images))
    # The frozen encoder in inference mode: BatchNorm reads its running statistics, nothing is
    # differentiated or written back.
    features = nnx.merge(graphdef, encoder_state)(inputs).astype(jnp.float32)
    if standardizer is not None:
        features = (features - standardizer[0]) * standardizer[1]
    return _update_heads(heads, opt_state, features, labels, learning_rates, spec, tclip)


def init_opt_state(spec: SgdSpec, heads: Head) -> optax.OptState:
    return jax.vmap(spec.build(0.0).init)(heads)


def train_heads(encoder: nnx.Module, batches: Iterator[dict[str, np.ndarray]], *,
                num_classes: int, spec: SgdSpec, learning_rates: Sequence[float], mesh: Mesh,
                seed: int, checkpoints: UnitCheckpoints, augment: DeviceAugment | None = None,
                tclip: tuple[float, float] = (0.0, 0.0),
                standardizer: Standardizer | None = None) -> tuple[Head, np.ndarray]:
    """(stacked heads, each head's last loss) after ``spec.total_steps`` steps on host batches
    {"image" uint8, "label"} (a Grain iterator: its position is checkpointed), one head per
    learning rate, the encoder frozen, its features standardised first when ``standardizer``
    is given. Resumes from ``checkpoints``."""
    encoder.eval()
    graphdef, encoder_state = nnx.split(encoder)
    encoder_state = replicate(encoder_state, mesh)
    heads = replicate(zero_heads(len(learning_rates), encoder.num_features, num_classes), mesh)
    tree = {"heads": heads, "opt_state": init_opt_state(spec, heads),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "loss": jnp.zeros(len(learning_rates))}
    resumed = checkpoints.restore(replicate(tree, mesh))
    tree = resumed.tree
    if resumed.data_state is not None:
        batches.set_state(resumed.data_state)
    base_key = jax.random.wrap_key_data(tree["rng"])
    rates = jnp.asarray(learning_rates, jnp.float32)
    if standardizer is not None:
        standardizer = replicate(tuple(jnp.asarray(a, jnp.float32) for a in standardizer), mesh)
    for index in range(resumed.step, spec.total_steps):
        batch = next(batches)
        sharded = shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        heads, opt_state, loss = _heads_step(
            tree["heads"], tree["opt_state"], encoder_state, sharded["image"], sharded["label"],
            jax.random.fold_in(base_key, index), rates, standardizer, graphdef=graphdef, spec=spec,
            augment=augment, tclip=tclip)
        tree = {**tree, "heads": heads, "opt_state": opt_state, "loss": loss}
        checkpoints.maybe_save(index + 1, tree, batches.get_state)
    return tree["heads"], np.asarray(tree["loss"])


@functools.partial(jax.jit, static_argnames=("spec", "length", "batch_size", "per_epoch",
                                          "tclip"))
def _fit_chunk(carry: tuple[Head, optax.OptState], x: jax.Array, y: jax.Array,
               learning_rates: jax.Array, key: jax.Array, start: jax.Array, *, spec: SgdSpec,
               length: int, batch_size: int, per_epoch: int, tclip: tuple[float, float]):
    """Steps [start, start + length) of every head on fixed features, one reshuffle per epoch
    (drop remainder), as :func:`byol_flax.evaluation.classifier.fit_linear_on_features`."""

    def one_step(carry, step):
        heads, opt_state, _ = carry
        epoch, position = jnp.divmod(step, per_epoch)
        order = jax.random.permutation(jax.random.fold_in(key, epoch), len(x))
        index = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
        return _update_heads(heads, opt_state, x[index], y[index], learning_rates, spec,
                             tclip), None

    heads, opt_state = carry
    loss = jnp.zeros(learning_rates.shape)
    (heads, opt_state, loss), _ = jax.lax.scan(one_step, (heads, opt_state, loss),
                                               start + jnp.arange(length))
    return heads, opt_state, loss


def fit_heads_on_features(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                          spec: SgdSpec, learning_rates: Sequence[float], batch_size: int,
                          seed: int, checkpoints: UnitCheckpoints, chunk_steps: int = 0,
                          tclip: tuple[float, float] = (0.0, 0.0)) -> tuple[Head, np.ndarray]:
    """(stacked heads, last losses): zero-initialised heads, one per learning rate, trained on
    fixed features for ``spec.total_steps`` steps, in chunks of ``chunk_steps`` (0: one) between
    which ``checkpoints`` saves and may stop."""
    x, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32)
    batch, per_epoch = steps_per_epoch(len(x), batch_size)
    heads = zero_heads(len(learning_rates), x.shape[1], num_classes)
    tree = {"heads": heads, "opt_state": init_opt_state(spec, heads),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "loss": jnp.zeros(len(learning_rates))}
    resumed = checkpoints.restore(tree)
    tree, step = resumed.tree, resumed.step
    rates = jnp.asarray(learning_rates, jnp.float32)
    chunk = chunk_steps or spec.total_steps
    while step < spec.total_steps:
        length = min(chunk, spec.total_steps - step)
        heads, opt_state, loss = _fit_chunk(
            (tree["heads"], tree["opt_state"]), x, y, rates,
            jax.random.wrap_key_data(tree["rng"]), jnp.int32(step), spec=spec, length=length,
            batch_size=batch, per_epoch=per_epoch, tclip=tclip)
        tree, step = {**tree, "heads": heads, "opt_state": opt_state, "loss": loss}, step + length
        checkpoints.maybe_save(step, tree, lambda: None)
    return tree["heads"], np.asarray(tree["loss"])


def unstack(heads: Head, losses: np.ndarray, learning_rates: Sequence[float]
            ) -> list[Head | FloatingPointError]:
    """Each head on its own, or the error of a head whose loss is not finite (it diverged)."""
    out: list[Head | FloatingPointError] = []
    for index, learning_rate in enumerate(learning_rates):
        if np.isfinite(losses[index]):
            out.append(jax.tree.map(lambda leaf, i=index: leaf[i], heads))
        else:
            out.append(FloatingPointError(f"classifier loss is {losses[index]} at learning rate "
                                          f"{learning_rate}: lower it"))
    return out
