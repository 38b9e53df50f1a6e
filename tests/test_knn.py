"""Weighted kNN of the online monitor."""

import jax.numpy as jnp
import numpy as np

from byol_flax.evaluation.knn import knn_predict


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_knn_recovers_clusters_and_weights_by_similarity():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(5, 16)))
    labels = rng.integers(0, 5, 500)
    train = unit(centres[labels] + 0.1 * rng.normal(size=(500, 16)))
    query_labels = rng.integers(0, 5, 100)
    queries = unit(centres[query_labels] + 0.1 * rng.normal(size=(100, 16)))
    predicted = knn_predict(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(queries), k=20,
                            temperature=0.07, num_classes=5, chunk=32)
    np.testing.assert_array_equal(predicted, query_labels)


def test_nearest_neighbour_outweighs_a_distant_majority():
    train = unit(np.array([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0], [-0.05, 1.0]]))
    labels = np.array([0, 1, 1, 1])
    query = unit(np.array([[1.0, 0.02]]))
    # Three class-1 votes at cosine ~0 against one class-0 vote at cosine ~1, T = 0.07.
    assert int(knn_predict(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(query), k=4,
                           temperature=0.07, num_classes=2)[0]) == 0
    # k larger than the memory is clipped.
    assert knn_predict(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(query), k=200,
                       temperature=0.07, num_classes=2).shape == (1,)
