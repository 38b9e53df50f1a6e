"""One training state: online network, EMA target network, optimizer state and step.

The target is an exact copy of the online encoder and projector at step 0 (Appendix J.5) and is
updated only by the exponential moving average xi <- tau xi + (1 - tau) theta of the online
``nnx.Param``s (Algorithm 1 line 11); it never receives gradients.

Target BatchNorm: like the official implementation, the target network runs in training mode,
normalising with the statistics of the batch it sees, and keeps its *own* running statistics
(updated by its own forward passes, not averaged from the online network). Running statistics
are ``nnx.BatchStat`` and are never touched by the optimizer or by the EMA.
"""

import jax
import optax
from flax import nnx
from ml_collections import ConfigDict

from byol_flax.models import ByolNetwork, build_online_network, target_from_online
from byol_flax.models.byol import build_online_classifier
from byol_flax.models.init import init_module
from byol_flax.optim import build_optimizer


class RngKey(nnx.Variable):
    """Raw uint32 key data (not a typed key), so checkpoints store it as a plain array."""


class TrainState(nnx.Module):
    """Everything a BYOL run carries from step to step."""

    def __init__(self, online: ByolNetwork, optimizer_tx, *, seed: int = 0,
                 target: ByolNetwork | None = None, with_target: bool = True,
                 classifier: nnx.Linear | None = None, classifier_tx=None):
        self.online = online
        # Without a target network (Table 19's sg(theta) and theta targets) nothing is averaged.
        if target is None and with_target:
            target = target_from_online(online)
        self.target = target
        self.optimizer = nnx.Optimizer(online, optimizer_tx, wrt=nnx.Param)
        # The official online classifier (see create_train_state): outside the online network,
        # so it is neither averaged into the target nor part of the BYOL optimizer's state.
        self.classifier = classifier
        self.classifier_optimizer = (None if classifier is None else
                                     nnx.Optimizer(classifier, classifier_tx, wrt=nnx.Param))
        self.rng = RngKey(jax.random.key_data(jax.random.key(seed)))

    def step_key(self) -> jax.Array:
        """The key of the current step's augmentations: a function of (seed, step) only, so a
        resumed run draws exactly the augmentations an uninterrupted one would."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng[...]), self.step)

    @property
    def step(self) -> jax.Array:
        """Number of optimizer updates applied so far (k in the schedules)."""
        return self.optimizer.step[...]

    def online_without_predictor(self) -> ByolNetwork:
        """A view of the online encoder and projector with the same structure as the target."""
        return ByolNetwork(self.online.encoder, self.online.projector)

    def update_target(self, tau: jax.Array) -> None:
        """xi <- tau xi + (1 - tau) theta over parameters; tau = 0 makes the target a hard copy."""
        if self.target is None:
            return
        target_params = nnx.state(self.target, nnx.Param)
        online_params = nnx.state(self.online_without_predictor(), nnx.Param)
        nnx.update(self.target, jax.tree.map(lambda xi, theta: tau * xi + (1.0 - tau) * theta,
                                             target_params, online_params))


def create_train_state(config: ConfigDict, learning_rate: optax.Schedule, *,
                       num_classes: int = 0, abstract: bool = False) -> TrainState:
    """Builds the online network from ``config.seed``, its target copy and the LARS optimizer
    (all initialisers compiled as one program: :func:`byol_flax.models.init.init_module`).

    With ``config.model.online_classifier`` and ``num_classes > 0``, also the official
    implementation's online classifier: a linear layer on the stop-gradient representation,
    trained with the labels by its own LARS (the same hyper-parameters and schedule the official
    code applies to it) and initialised from its own seed, so the online network is the same
    with or without it. ``abstract``: shapes and dtypes only, nothing allocated or computed (the
    pre-flight compiles the step of a model of any size from them).
    """

    def build() -> TrainState:
        online = build_online_network(config.model, rngs=nnx.Rngs(config.seed))
        classifier, classifier_tx = None, None
        if config.model.online_classifier and num_classes > 0:
            classifier = build_online_classifier(online.encoder.num_features, num_classes,
                                                 rngs=nnx.Rngs(config.seed + 2))
            classifier_tx = build_optimizer(config.optimizer, classifier, learning_rate)
        return TrainState(online, build_optimizer(config.optimizer, online, learning_rate),
                          seed=config.seed + 1, with_target=config.target.kind == "ema",
                          classifier=classifier, classifier_tx=classifier_tx)

    return nnx.eval_shape(build) if abstract else init_module(build)
