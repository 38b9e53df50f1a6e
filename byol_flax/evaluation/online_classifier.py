"""Held-out top-1 of the online classifier trained during pre-training (official implementation).

The classifier (:func:`byol_flax.train_state.create_train_state`) is a linear layer on the
stop-gradient representation; here it is applied to the encoder's representation of the test
split (during pre-training ``monitor.eval_split``; evaluation view, BatchNorm in inference
mode), the curve the official code reports while BYOL trains. Only a training state carries the
classifier: exports and checkpointed encoders do not. It reads the encoder's features like kNN
does, so a monitor step that runs both passes the encoder over the split once.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import byol_flax.evaluation.classifier as clf
from byol_flax.evaluation.base import Context, protocol, result
from byol_flax.evaluation.features import encoder_features
from byol_flax.sharding import replicate, shard_batch
from byol_flax.weights.encoder import SourceError


@functools.partial(jax.jit, static_argnames="graphdef")
def _head(state: nnx.State, features: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
    return nnx.merge(graphdef, state)(features).astype(jnp.float32)


def head_logits(head: nnx.Module, features: np.ndarray, mesh: Mesh, *, batch_size: int
                ) -> np.ndarray:
    """Logits of ``head`` on (global) ``features``, in padded global batches of ``batch_size``
    sharded over ``mesh``: the shapes of an encoder-and-head pass over the images."""
    graphdef, state = nnx.split(head)
    state = replicate(state, mesh)
    local = batch_size // jax.process_count()
    start = jax.process_index() * local
    logits = []
    for offset in range(0, len(features), batch_size):
        rows = np.asarray(features[offset:offset + batch_size])
        block = np.zeros((batch_size, *features.shape[1:]), features.dtype)
        block[:len(rows)] = rows
        out = _head(state, shard_batch(block[start:start + local], mesh), graphdef=graphdef)
        logits.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:len(rows)])
    return np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)


@protocol("online_classifier", reads_monitor_data=False)  # its classes are the training labels
def run_online_classifier(ctx: Context) -> dict[str, Any]:
    """Accuracies of the online classifier on the test split; nothing is fitted."""
    classifier = ctx.pretrained.classifier
    if classifier is None:
        raise SourceError(f"{ctx.pretrained.origin}: no online classifier (only a training "
                          "state has one: use it as a monitor, config.monitor.evaluators)")
    features, labels = encoder_features(ctx, ctx.test, limit=ctx.eval_limit)
    logits = head_logits(classifier, features, ctx.mesh, batch_size=ctx.config.feature_batch_size)
    return result(ctx, "online_classifier", [], {}, clf.accuracy_metrics(logits, labels))
