"""Weighted kNN on frozen encoder features: a cheap online monitor of representation quality.

Cosine similarity between l2-normalised representations y (the encoder's output, BatchNorm in
inference mode), the k nearest labelled neighbours vote with weight exp(sim / T) (Wu et al.,
2018). Reported as top-1 accuracy on a held-out split for each k.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from byol_flax.data.augment import normalize, to_unit_float
from byol_flax.data.pipeline import OpenedSplit, eval_dataset, open_split
from byol_flax.evaluation.base import EVALUATORS
from byol_flax.sharding import shard_batch


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


def make_embed_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """Jitted images (uint8) -> l2-normalised online representations, BatchNorm in eval mode."""

    @jax.jit
    def embed(state: nnx.State, images: jax.Array) -> jax.Array:
        encoder = nnx.merge(graphdef, state).online.encoder
        encoder.eval()
        features = encoder(normalize(to_unit_float(images))).astype(jnp.float32)
        return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)

    return embed


@EVALUATORS.register("knn")
class KnnMonitor:
    """Evaluator: ``run(state) -> {"knn/top1_k20": ..., ...}`` on ``config.monitor`` splits."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef):
        self._config = config
        self._mesh = mesh
        self._embed = make_embed_fn(graphdef)
        self._train = open_split(config.data, config.monitor.train_split)
        self._eval = open_split(config.data, config.monitor.eval_split)
        self._num_classes = self._train.manifest.num_classes

    def _features(self, state: nnx.State, opened: OpenedSplit, limit: int
                  ) -> tuple[jax.Array, np.ndarray]:
        process_count = jax.process_count()
        # validate_config makes monitor.batch_size a multiple of the device count.
        local_batch = self._config.monitor.batch_size // process_count
        count = min(limit, opened.num_records) if limit else opened.num_records
        # Every process runs the same number of batches (the collectives below must match).
        num_batches = -(-(-(-count // process_count)) // local_batch)
        size = self._config.data.image_size
        batches = iter(eval_dataset(self._config, opened, batch_size=local_batch, limit=limit,
                                    process_index=jax.process_index(),
                                    process_count=process_count))
        features, labels = [], []
        for _ in range(num_batches):
            batch = next(batches, None)
            n = 0 if batch is None else len(batch["label"])
            images = np.zeros((local_batch, size, size, 3), np.uint8)
            label = np.zeros(local_batch, np.int32)
            valid = np.arange(local_batch) < n
            if n:
                images[:n], label[:n] = batch["image"], batch["label"]
            out = self._embed(state, shard_batch(images, self._mesh))
            gathered = np.asarray(multihost_utils.process_allgather(out, tiled=True))
            mask = np.asarray(multihost_utils.process_allgather(valid, tiled=True))
            label = np.asarray(multihost_utils.process_allgather(label, tiled=True))
            features.append(gathered[mask])
            labels.append(label[mask])
        return jnp.asarray(np.concatenate(features)), np.concatenate(labels)

    def run(self, state: nnx.State) -> dict[str, Any]:
        monitor = self._config.monitor
        train_x, train_y = self._features(state, self._train, monitor.max_train_examples)
        eval_x, eval_y = self._features(state, self._eval, monitor.max_eval_examples)
        results = {}
        for k in monitor.knn_k:
            predicted = knn_predict(train_x, jnp.asarray(train_y), eval_x, k=k,
                                    temperature=monitor.knn_temperature,
                                    num_classes=self._num_classes)
            results[f"knn/top1_k{k}"] = float(np.mean(np.asarray(predicted) == eval_y))
        return results
