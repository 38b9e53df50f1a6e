"""Weighted kNN of the online monitor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_flax.evaluation.knn import knn_accuracy, knn_neighbours, knn_predict


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


# --- The streamed bank against the whole-bank kNN it replaced -----------------------------------


def whole_bank_predict(train_features, train_labels, queries, *, k, temperature, num_classes,
                       chunk=1024):
    """The previous knn_predict: every query block against the whole bank at once."""
    k = min(k, train_features.shape[0])

    @jax.jit
    def predict(q):
        sims = q @ train_features.T
        top_sims, top_index = jax.lax.top_k(sims, k)
        weights = jnp.exp(top_sims / temperature)
        votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
        return jnp.argmax(votes.sum(axis=1), axis=-1), top_index, top_sims

    outs = [predict(queries[i:i + chunk]) for i in range(0, len(queries), chunk)]
    return tuple(np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(3))


def clustered(seed, n, q, dim=32, classes=7):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n).astype(np.int32)
    bank = (centres[labels] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32)
    query_labels = rng.integers(0, classes, q).astype(np.int32)
    queries = (centres[query_labels] + 1.5 * rng.normal(size=(q, dim))).astype(np.float32)
    return bank, labels, queries, query_labels


@pytest.mark.parametrize(("rows", "dim", "bank_chunk"),
                         [(1040, 32, 80), (1000, 32, 4096), (1000, 256, 64)])
def test_streamed_neighbours_and_predictions_equal_the_whole_bank(rows, dim, bank_chunk):
    bank, labels, queries, _ = clustered(0, rows, 130, dim=dim)
    bank, queries = unit(bank), unit(queries)
    for k in (1, 20):
        expected, index, sims = whole_bank_predict(jnp.asarray(bank), jnp.asarray(labels),
                                                   jnp.asarray(queries), k=k, temperature=0.07,
                                                   num_classes=7, chunk=128)
        neighbours = knn_neighbours(bank, jnp.asarray(queries), k=k, bank_chunk=bank_chunk,
                                    query_block=128)
        np.testing.assert_array_equal(np.concatenate([np.asarray(n[1]) for n in neighbours]),
                                      index)
        got_sims = np.concatenate([np.asarray(n[0]) for n in neighbours])
        if rows % 16 == 0 or rows <= bank_chunk:  # the whole bank's dot kernel: same bits
            np.testing.assert_array_equal(got_sims, sims)
        else:  # XLA's kernel for a bank of 1000 rows sums in another order
            np.testing.assert_allclose(got_sims, sims, rtol=2e-6)
        got = knn_predict(bank, labels, queries, k=k, temperature=0.07, num_classes=7,
                          chunk=128, bank_chunk=bank_chunk)
        np.testing.assert_array_equal(got, expected)


def test_equal_similarities_go_to_the_lower_bank_index_across_chunks():
    """Duplicate bank rows (exact ties, also split by chunk boundaries) and orthogonal ones:
    the neighbour order is the whole-bank top_k's, lower index first."""
    rng = np.random.default_rng(1)
    basis = np.eye(8, dtype=np.float32)
    rows = rng.integers(0, 8, 160)
    bank = basis[rows]  # every similarity is exactly 0 or 1: ties everywhere
    labels = rng.integers(0, 3, 160).astype(np.int32)
    queries = basis[rng.integers(0, 8, 40)]
    for k in (5, 160):
        expected, index, _ = whole_bank_predict(jnp.asarray(bank), jnp.asarray(labels),
                                                jnp.asarray(queries), k=k, temperature=0.5,
                                                num_classes=3)
        for bank_chunk in (16, 48):
            neighbours = knn_neighbours(bank, jnp.asarray(queries), k=k, bank_chunk=bank_chunk)
            got = np.asarray(neighbours[0][1])
            np.testing.assert_array_equal(got, index)
            np.testing.assert_array_equal(
                knn_predict(bank, labels, queries, k=k, temperature=0.5, num_classes=3,
                            bank_chunk=bank_chunk), expected)
    # The first neighbours of a query are the bank's copies of it, in index order.
    first = np.flatnonzero(rows == np.argmax(queries[0]))
    np.testing.assert_array_equal(np.asarray(knn_neighbours(
        bank, jnp.asarray(queries[:1]), k=len(first), bank_chunk=16)[0][1])[0], first)


def test_accuracy_from_a_memory_mapped_bank_equals_the_in_memory_whole_bank(tmp_path):
    bank, labels, queries, query_labels = clustered(2, 2000, 257, dim=48)
    memmap = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float32,
                                       shape=bank.shape)
    memmap[:] = bank
    memmap.flush()
    on_disk = np.load(tmp_path / "bank.npy", mmap_mode="r")
    got = knn_accuracy((on_disk, labels), (queries, query_labels), ks=(20, 200),
                       temperature=0.07, num_classes=7, bank_chunk=64)
    unit_bank = bank / np.maximum(np.linalg.norm(bank, axis=-1, keepdims=True), 1e-12)
    unit_queries = queries / np.maximum(np.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
    for k in (20, 200):
        expected = whole_bank_predict(jnp.asarray(unit_bank), jnp.asarray(labels),
                                      jnp.asarray(unit_queries), k=k, temperature=0.07,
                                      num_classes=7)[0]
        assert got[k] == float(np.mean(expected == query_labels))
    assert 0.3 < got[20] < 1.0  # the clusters overlap: a real score, not a trivial one
