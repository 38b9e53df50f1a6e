"""Weighted kNN on frozen encoder features: a cheap online monitor of representation quality.

Cosine similarity between l2-normalised representations y (the encoder's output, BatchNorm in
inference mode), the k nearest labelled neighbours vote with weight exp(sim / T) (Wu et al.,
2018). Reported as top-1 accuracy on a held-out split for each k.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from byol_flax.data.pipeline import open_split
from byol_flax.evaluation.base import EVALUATORS, monitor_data
from byol_flax.evaluation.features import eval_representation, extract_features


def knn_predict(train_features: jax.Array, train_labels: jax.Array, queries: jax.Array, *,
                k: int, temperature: float, num_classes: int, chunk: int = 1024) -> jax.Array:
    """Class predicted for each query by its k nearest (cosine) training examples."""
    k = min(k, train_features.shape[0])

    @jax.jit
    def predict(q):
        sims = q @ train_features.T
        top_sims, top_index = jax.lax.top_k(sims, k)
        weights = jnp.exp(top_sims / temperature)
        votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
        return jnp.argmax(votes.sum(axis=1), axis=-1)

    return jnp.concatenate([predict(queries[i:i + chunk]) for i in range(0, len(queries), chunk)])


def knn_accuracy(train: tuple[np.ndarray, np.ndarray], queries: tuple[np.ndarray, np.ndarray], *,
                 ks: Sequence[int], temperature: float, num_classes: int) -> dict[int, float]:
    """Top-1 accuracy of the weighted kNN classifier for each k; features are l2-normalised here
    (a no-op for the monitor's already-normalised embeddings)."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    train_x, eval_x = jnp.asarray(unit(train[0])), jnp.asarray(unit(queries[0]))
    return {k: float(np.mean(np.asarray(knn_predict(
        train_x, jnp.asarray(train[1]), eval_x, k=k, temperature=temperature,
        num_classes=num_classes)) == queries[1])) for k in ks}


def make_embed_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """Jitted images (uint8) -> l2-normalised online representations, BatchNorm in eval mode."""

    @jax.jit
    def embed(state: nnx.State, images: jax.Array) -> jax.Array:
        features = eval_representation(nnx.merge(graphdef, state), images)
        return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)

    return embed


@EVALUATORS.register("knn")
class KnnMonitor:
    """Evaluator: ``run(state) -> {"knn/top1_k20": ..., ...}`` on ``config.monitor`` splits."""

    needs_labels = True  # switched off at start-up for data without labels
    reads_monitor_data = True  # config.monitor.data_dir, when set: any labelled dataset

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef):
        self._config = config
        self._mesh = mesh
        self._embed = make_embed_fn(graphdef)
        self._train = open_split(monitor_data(config), config.monitor.train_split)
        self._eval = open_split(monitor_data(config), config.monitor.eval_split)
        self._num_classes = self._train.manifest.num_classes

    def run(self, state: nnx.State) -> dict[str, Any]:
        monitor = self._config.monitor
        # validate_config makes monitor.batch_size a multiple of the device count.
        features = functools.partial(extract_features, self._embed, state, config=self._config,
                                     mesh=self._mesh, batch_size=monitor.batch_size)
        train = features(self._train, limit=monitor.max_train_examples)
        queries = features(self._eval, limit=monitor.max_eval_examples)
        accuracy = knn_accuracy(train, queries, ks=monitor.knn_k,
                                temperature=monitor.knn_temperature, num_classes=self._num_classes)
        return {f"knn/top1_k{k}": value for k, value in accuracy.items()}
