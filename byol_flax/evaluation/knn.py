"""Weighted kNN on frozen encoder features: the cheap monitor of representation quality during
pre-training, and the same protocol offline (``config.protocol = "knn"``).

Cosine similarity between l2-normalised representations y (the encoder's output, BatchNorm in
inference mode), the k nearest labelled neighbours vote with weight exp(sim / T) (Wu et al.,
2018). Reported as top-1 accuracy for each k on the test split (during pre-training:
``monitor.eval_split``).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from byol_flax.evaluation.base import Context, protocol, result


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
    """Top-1 accuracy of the weighted kNN classifier for each k; features are l2-normalised
    here."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    train_x, eval_x = jnp.asarray(unit(train[0])), jnp.asarray(unit(queries[0]))
    return {k: float(np.mean(np.asarray(knn_predict(
        train_x, jnp.asarray(train[1]), eval_x, k=k, temperature=temperature,
        num_classes=num_classes)) == queries[1])) for k in ks}


@protocol("knn")
def run_knn(ctx: Context) -> dict[str, Any]:
    """Top-1 for each ``knn.k`` on selection and test, with train as the memory."""
    cfg = ctx.config.knn
    train = ctx.features(ctx.train, limit=ctx.train_limit)
    scores = {}
    for split in (ctx.selection, ctx.test):  # one split in the monitor: scored once
        key = (split.data_dir, split.split)
        if key not in scores:
            accuracy = knn_accuracy(train, ctx.features(split, limit=ctx.eval_limit), ks=cfg.k,
                                    temperature=cfg.temperature, num_classes=ctx.num_classes)
            scores[key] = {f"top1_k{k}": value for k, value in accuracy.items()}
    selection, test = (scores[(s.data_dir, s.split)] for s in (ctx.selection, ctx.test))
    return result(ctx, "knn", [], {"k": list(cfg.k), "temperature": cfg.temperature}, test,
                  selection=selection)
