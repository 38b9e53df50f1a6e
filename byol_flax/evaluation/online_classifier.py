"""Held-out top-1 of the online classifier trained during pre-training (official implementation).

The classifier (:func:`byol_flax.train_state.create_train_state`) is a linear layer on the
stop-gradient representation; here it is applied to the encoder's representation of the
``config.monitor.eval_split`` images (evaluation view, BatchNorm in inference mode), the curve the
official code reports while BYOL trains.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from byol_flax.data.pipeline import open_split
from byol_flax.evaluation.base import EVALUATORS
from byol_flax.evaluation.features import eval_representation, extract_features


@EVALUATORS.register("online_classifier")
class OnlineClassifierMonitor:
    """Evaluator: ``run(state) -> {"online_classifier/top1": ...}``."""

    needs_labels = True  # switched off at start-up for data without labels

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef):
        self._config = config
        self._mesh = mesh
        self._eval = open_split(config.data, config.monitor.eval_split)

        @jax.jit
        def predict(state: nnx.State, images: jax.Array) -> jax.Array:
            train_state = nnx.merge(graphdef, state)
            logits = train_state.classifier(eval_representation(train_state, images))
            return jnp.argmax(logits, axis=-1)

        self._predict = predict

    def run(self, state: nnx.State) -> dict[str, Any]:
        monitor = self._config.monitor
        predicted, labels = extract_features(self._predict, state, self._eval, self._config,
                                             self._mesh, batch_size=monitor.batch_size,
                                             limit=monitor.max_eval_examples)
        return {"online_classifier/top1": float(np.mean(predicted == labels))}
