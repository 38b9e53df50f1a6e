"""Supervised heads and classifiers trained by the evaluation protocols.

* :func:`fit_linear_on_features`: a linear classifier on precomputed frozen features (linear
  evaluation without augmentation; the fast path on small data).
* :class:`Classifier` + :func:`train_classifier`: encoder + linear head trained on images, with
  the encoder frozen (linear evaluation with augmentations: weights *and* BatchNorm statistics
  untouched) or trained (semi-supervised fine-tuning, transfer fine-tuning).
* :func:`classification_loss`: cross-entropy, optionally with Table 7's tclip regularisation.
* :func:`accuracy_metrics`: top-1, top-5 and mean per-class accuracy.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from byol_flax.data.augment import normalize, to_unit_float
from byol_flax.evaluation.resumable import UnitCheckpoints
from byol_flax.runtime.xla import speed_up_tracing
from byol_flax.sharding import replicate, shard_batch

speed_up_tracing()  # classifier steps write nnx Variables too (see the function)

# (key, uint8 images) -> network inputs (normalised floats).
DeviceAugment = Callable[[jax.Array, jax.Array], jax.Array]


def tclip(logits: jax.Array, alpha: float) -> jax.Array:
    """Appendix D.1 (Table 7 variant): tclip(x) = alpha * tanh(x / alpha)."""
    return alpha * jnp.tanh(logits / alpha)


def classification_loss(logits: jax.Array, labels: jax.Array, *, tclip_alpha: float = 0.0,
                        tclip_beta: float = 0.0) -> jax.Array:
    """Mean cross-entropy; with ``tclip_alpha > 0`` the regularised loss of Appendix D.1:
    cross_entropy(tclip(x), y) + beta * average(tclip(x)^2)."""
    logits = logits.astype(jnp.float32)
    penalty = 0.0
    if tclip_alpha:
        logits = tclip(logits, tclip_alpha)
        penalty = tclip_beta * jnp.mean(jnp.square(logits))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + penalty


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 (top-k with k = min(5, classes)) and mean per-class top-1 accuracy."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    k = min(5, logits.shape[1])
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    correct = top_k[:, 0] == labels
    per_class = [correct[labels == c].mean() for c in np.unique(labels)]
    return {"top1": float(correct.mean()),
            "top5": float(np.any(top_k == labels[:, None], axis=1).mean()),
            "mean_per_class": float(np.mean(per_class))}


@dataclasses.dataclass(frozen=True)
class SgdSpec:
    """SGD with (Nesterov) momentum as the protocols use it, minus the swept values.

    The learning rate and weight decay are passed to :meth:`build` as (traced) arrays, so one
    compiled step serves every point of a sweep. Weight decay is added to the gradient before
    momentum, as in the paper's fine-tuning; ``schedule="cosine"`` decays the LR to zero.
    """

    total_steps: int
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"

    def build(self, learning_rate: jax.Array | float, weight_decay: jax.Array | float = 0.0
              ) -> optax.GradientTransformation:
        lr = (optax.cosine_decay_schedule(learning_rate, max(self.total_steps, 1))
              if self.schedule == "cosine" else learning_rate)
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(lr, momentum=self.momentum, nesterov=self.nesterov))


def sgd_spec(section: Any, total_steps: int) -> SgdSpec:
    """The :class:`SgdSpec` of a protocol's config section (momentum, nesterov, schedule)."""
    return SgdSpec(total_steps=total_steps, momentum=section.momentum,
                   nesterov=section.nesterov, schedule=section.schedule)


def steps_per_epoch(num_examples: int, batch_size: int) -> tuple[int, int]:
    """(batch actually used, steps per epoch): a batch larger than the data shrinks to the
    largest multiple of the device count that fits."""
    batch = min(batch_size, num_examples - num_examples % jax.device_count())
    if batch <= 0:
        raise ValueError(f"{num_examples} training examples cannot fill one batch over "
                         f"{jax.device_count()} devices")
    return batch, max(num_examples // batch, 1)


@functools.partial(jax.jit, static_argnames=("spec", "num_classes", "batch_size", "per_epoch",
                                          "tclip_alpha", "tclip_beta"))
def _fit_linear(x: jax.Array, y: jax.Array, learning_rate: jax.Array, key: jax.Array, *,
                spec: SgdSpec, num_classes: int, batch_size: int, per_epoch: int,
                tclip_alpha: float, tclip_beta: float) -> dict[str, jax.Array]:
    params = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    tx = spec.build(learning_rate)

    def loss(p, xb, yb):
        return classification_loss(xb @ p["kernel"] + p["bias"], yb, tclip_alpha=tclip_alpha,
                                   tclip_beta=tclip_beta)

    def one_step(carry, step):
        params, opt_state = carry
        epoch, position = jnp.divmod(step, per_epoch)
        order = jax.random.permutation(jax.random.fold_in(key, epoch), len(x))
        index = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
        grads = jax.grad(loss)(params, x[index], y[index])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(one_step, (params, tx.init(params)),
                                  jnp.arange(spec.total_steps))
    return params


def fit_linear_on_features(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                           spec: SgdSpec, learning_rate: float, batch_size: int, seed: int,
                           tclip_alpha: float = 0.0, tclip_beta: float = 0.0
                           ) -> dict[str, jax.Array]:
    """A zero-initialised linear classifier {"kernel", "bias"} trained on fixed features for
    ``spec.total_steps`` steps, one reshuffle per epoch (drop remainder)."""
    x, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32)
    batch, per_epoch = steps_per_epoch(len(x), batch_size)
    return _fit_linear(x, y, jnp.float32(learning_rate), jax.random.key(seed), spec=spec,
                       num_classes=num_classes, batch_size=batch, per_epoch=per_epoch,
                       tclip_alpha=tclip_alpha, tclip_beta=tclip_beta)


def linear_logits(params: dict[str, jax.Array], features: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(features, jnp.float32) @ params["kernel"] + params["bias"])


class Classifier(nnx.Module):
    """Encoder + linear head (zero-initialised): normalised images -> logits."""

    def __init__(self, encoder: nnx.Module, num_classes: int, *, seed: int = 0):
        self.encoder = encoder
        self.head = nnx.Linear(encoder.num_features, num_classes,
                               kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(seed))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.encoder(images))


HEAD_ONLY = nnx.All(nnx.Param, nnx.PathContains("head"))


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "augment", "tclip"),
                   donate_argnames=("trainable", "frozen", "opt_state"))
def _classifier_step(trainable: nnx.State, frozen: nnx.State, opt_state: optax.OptState,
                     images: jax.Array, labels: jax.Array, key: jax.Array, hparams: jax.Array, *,
                     graphdef: nnx.GraphDef, spec: SgdSpec, augment: DeviceAugment | None,
                     tclip: tuple[float, float]):
    inputs = augment(key, images) if augment else normalize(to_unit_float(images))

    def loss(trainable):
        # copy=True: fresh Variables at this trace level (BatchNorm statistics may be mutated).
        model = nnx.merge(graphdef, trainable, frozen, copy=True)
        value = classification_loss(model(inputs), labels, tclip_alpha=tclip[0],
                                    tclip_beta=tclip[1])
        return value, nnx.state(model, nnx.Not(nnx.Param))

    (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    tx = spec.build(hparams[0], hparams[1])
    updates, opt_state = tx.update(grads, opt_state, trainable)
    # frozen = everything not trained: BatchNorm statistics (updated in training mode) and, for
    # a frozen encoder, its parameters (passed through unchanged).
    frozen = nnx.merge_state(frozen, rest) if rest else frozen
    return optax.apply_updates(trainable, updates), frozen, opt_state, value


def train_classifier(classifier: Classifier, batches: Iterator[dict[str, np.ndarray]], *,
                     spec: SgdSpec, learning_rate: float, weight_decay: float = 0.0,
                     train_encoder: bool, mesh: Mesh, seed: int,
                     augment: DeviceAugment | None = None, tclip_alpha: float = 0.0,
                     tclip_beta: float = 0.0, checkpoints: UnitCheckpoints | None = None
                     ) -> Classifier:
    """``spec.total_steps`` SGD steps on host batches {"image" uint8, "label"}; updates and
    returns ``classifier``.

    Frozen encoder (``train_encoder=False``): the encoder runs in inference mode (BatchNorm uses
    and keeps its running statistics) and only the head's parameters are differentiated and
    updated, so the encoder's state is bit-for-bit what it was. The step is compiled once per
    (model, spec), whatever the learning rate and weight decay. With ``checkpoints`` (then
    ``batches`` is a Grain iterator, whose position is saved) training resumes where a stopped
    run saved and saves as it goes.
    """
    if train_encoder:
        classifier.train()
        wrt = nnx.Param
    else:
        classifier.encoder.eval()
        wrt = HEAD_ONLY
    graphdef, trainable, frozen = nnx.split(classifier, wrt, ...)
    # Copies: the step donates its inputs, and a cloned encoder shares arrays with the original.
    trainable, frozen = jax.tree.map(jnp.copy, replicate((trainable, frozen), mesh))
    tree = {"trainable": trainable, "frozen": frozen,
            "opt_state": spec.build(0.0).init(trainable),
            "rng": jax.random.key_data(jax.random.key(seed)), "loss": jnp.zeros(())}
    start = 0
    if checkpoints is not None:
        resumed = checkpoints.restore(replicate(tree, mesh))
        tree, start = resumed.tree, resumed.step
        if resumed.data_state is not None:
            batches.set_state(resumed.data_state)
    hparams = jnp.asarray([learning_rate, weight_decay], jnp.float32)
    base_key = jax.random.wrap_key_data(tree["rng"])
    for index in range(start, spec.total_steps):
        batch = next(batches)
        sharded = shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
        trainable, frozen, opt_state, value = _classifier_step(
            tree["trainable"], tree["frozen"], tree["opt_state"], sharded["image"],
            sharded["label"], jax.random.fold_in(base_key, index), hparams, graphdef=graphdef,
            spec=spec, augment=augment, tclip=(tclip_alpha, tclip_beta))
        tree = {**tree, "trainable": trainable, "frozen": frozen, "opt_state": opt_state,
                "loss": value}
        if checkpoints is not None:
            checkpoints.maybe_save(index + 1, tree, batches.get_state)
    value = tree["loss"]
    if not np.isfinite(float(value)):
        raise FloatingPointError(f"classifier loss is {float(value)} after {spec.total_steps} "
                                 f"steps at learning rate {learning_rate}: lower it")
    nnx.update(classifier, tree["trainable"], tree["frozen"])
    return classifier


@functools.partial(jax.jit, static_argnames="graphdef")
def _inference(state: nnx.State, images: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
    return nnx.merge(graphdef, state)(normalize(to_unit_float(images))).astype(jnp.float32)


def make_inference_fn(module: nnx.Module, mesh: Mesh
                      ) -> tuple[Callable[[nnx.State, jax.Array], jax.Array], nnx.State]:
    """(jitted (state, uint8 images) -> float32 outputs in inference mode, replicated state):
    features of an encoder or logits of a :class:`Classifier`, for ``extract_features``. One
    compilation per architecture: every evaluation of the same graph reuses it."""
    module.eval()
    graphdef, state = nnx.split(module)
    return functools.partial(_inference, graphdef=graphdef), replicate(state, mesh)
