"""Weighted kNN on frozen encoder features: the cheap monitor of representation quality during
pre-training, and the same protocol offline (``config.protocol = "knn"``).

Cosine similarity between l2-normalised representations y (the encoder's output, BatchNorm in
inference mode), the k nearest labelled neighbours vote with weight exp(sim / T) (Wu et al.,
2018). Reported as top-1 accuracy for each k on the test split (during pre-training:
``monitor.eval_split``).

The memory bank streams through the device in chunks of ``knn.bank_chunk`` rows (a NumPy array
or a memory map: read once), each query block keeping a running top-k, so the peak is
O(query block x chunk) whatever the bank's size. Neighbours and ties are those of one top-k over
the whole bank: equal similarities go to the lower bank index. The similarities themselves are
bitwise those of a whole-bank product when the bank fits one chunk or its row count is a
multiple of 16 (on this CPU; otherwise XLA picks another dot kernel for the whole bank and they
may differ in the last bit).
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from byol_flax.config import ConfigError
from byol_flax.evaluation.base import Context, protocol, result
from byol_flax.evaluation.features import encoder_features

# Bank rows per device chunk: 16384 x 2048 float32 is 128 MiB, and its similarities to a
# 1024-query block 64 MiB.
DEFAULT_BANK_CHUNK = 16384
QUERY_BLOCK = 1024


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames="k")
def _merge_chunk(values: jax.Array, indices: jax.Array, queries: jax.Array,
                 chunk_t: jax.Array, offset: jax.Array, valid: jax.Array, *, k: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Running top-k merged with one bank chunk's similarities. The running entries come first
    and hold lower bank indices, so top_k's lower-position-first ties keep the lower index. The
    chunk comes transposed, (D, rows): the CPU's dot kernel is then the one a whole-bank kNN
    with the bank as a compile-time constant used, and the similarities equal its bits."""
    sims = queries @ chunk_t
    column = jnp.arange(chunk_t.shape[1], dtype=jnp.int32)
    sims = jnp.where(column[None, :] < valid, sims, -jnp.inf)  # padding rows never win
    index = jnp.broadcast_to(offset + column, sims.shape)
    top, position = jax.lax.top_k(jnp.concatenate([values, sims], axis=1), k)
    return top, jnp.take_along_axis(jnp.concatenate([indices, index], axis=1), position, axis=1)


def _chunk_rows(bank_rows: int, wanted: int) -> int:
    """Rows of every device chunk: the whole bank when it fits (the shape of a whole-bank kNN),
    else ``wanted`` rounded up to a multiple of 16, the CPU dot kernel of such banks."""
    return bank_rows if bank_rows <= wanted else -(-wanted // 16) * 16


def knn_neighbours(bank: np.ndarray, queries: jax.Array, *, k: int,
                   bank_chunk: int = DEFAULT_BANK_CHUNK, query_block: int = QUERY_BLOCK,
                   normalize_bank: bool = False) -> list[tuple[jax.Array, jax.Array]]:
    """(similarities, bank indices) of each query block's ``k`` nearest bank rows, most similar
    first. ``bank`` stays on the host (or on disk, memory-mapped) and is read once, in chunks of
    ``bank_chunk`` rows, l2-normalised per chunk with ``normalize_bank``."""
    chunk_rows = _chunk_rows(len(bank), max(bank_chunk, k))
    blocks = [queries[i:i + query_block] for i in range(0, len(queries), query_block)]
    running = [(jnp.full((len(b), k), -jnp.inf, jnp.float32), jnp.full((len(b), k), -1, jnp.int32))
               for b in blocks]
    for offset in range(0, len(bank), chunk_rows):
        rows = np.asarray(bank[offset:offset + chunk_rows], np.float32)
        if normalize_bank:
            rows = _unit(rows)
        padded = np.zeros((rows.shape[1], chunk_rows), np.float32)
        padded[:, :len(rows)] = rows.T
        # The previous chunk's merges finish before this chunk goes to the device: dispatch is
        # asynchronous, and a loop running ahead would hold every chunk (the whole bank) at once.
        jax.block_until_ready(running)
        chunk = jnp.asarray(padded)
        running = [_merge_chunk(values, indices, block, chunk, jnp.int32(offset),
                                jnp.int32(len(rows)), k=k)
                   for block, (values, indices) in zip(blocks, running)]
    return running


# The temperature is static, a constant of the program as in a whole-bank kNN: the same
# division, bit for bit.
@functools.partial(jax.jit, static_argnames=("k", "num_classes", "temperature"))
def _vote(top_sims: jax.Array, top_index: jax.Array, labels: jax.Array, *, temperature: float,
          k: int, num_classes: int) -> jax.Array:
    weights = jnp.exp(top_sims[:, :k] / temperature)
    votes = jax.nn.one_hot(labels[top_index[:, :k]], num_classes) * weights[..., None]
    return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_classify(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *,
                 ks: Sequence[int], temperature: float, num_classes: int,
                 bank_chunk: int = DEFAULT_BANK_CHUNK, query_block: int = QUERY_BLOCK,
                 normalize: bool = False) -> dict[int, np.ndarray]:
    """Predicted class of every query for each k, from one streamed pass over the bank (the
    k nearest are the first k of the max(ks) nearest)."""
    k_max = min(max(ks), len(bank))
    if normalize:
        queries = _unit(np.asarray(queries))
    neighbours = knn_neighbours(bank, jnp.asarray(queries), k=k_max, bank_chunk=bank_chunk,
                                query_block=query_block, normalize_bank=normalize)
    labels = jnp.asarray(bank_labels)
    return {k: np.concatenate([np.asarray(_vote(sims, index, labels, temperature=temperature,
                                                k=min(k, k_max), num_classes=num_classes))
                               for sims, index in neighbours]) for k in ks}


def knn_predict(train_features: jax.Array, train_labels: jax.Array, queries: jax.Array, *,
                k: int, temperature: float, num_classes: int, chunk: int = QUERY_BLOCK,
                bank_chunk: int = DEFAULT_BANK_CHUNK) -> jax.Array:
    """Class predicted for each query by its k nearest (cosine) training examples; queries in
    blocks of ``chunk``, the bank in chunks of ``bank_chunk`` rows."""
    predicted = knn_classify(train_features, np.asarray(train_labels), queries, ks=(k,),
                             temperature=temperature, num_classes=num_classes,
                             bank_chunk=bank_chunk, query_block=chunk)
    return jnp.asarray(predicted[k])


def knn_accuracy(train: tuple[np.ndarray, np.ndarray], queries: tuple[np.ndarray, np.ndarray], *,
                 ks: Sequence[int], temperature: float, num_classes: int,
                 bank_chunk: int = DEFAULT_BANK_CHUNK) -> dict[int, float]:
    """Top-1 accuracy of the weighted kNN classifier for each k; features are l2-normalised
    here (the bank chunk by chunk, never copied whole)."""
    predicted = knn_classify(train[0], train[1], queries[0], ks=ks, temperature=temperature,
                             num_classes=num_classes, bank_chunk=bank_chunk, normalize=True)
    return {k: float(np.mean(predicted[k] == queries[1])) for k in ks}


@protocol("knn")
def run_knn(ctx: Context) -> dict[str, Any]:
    """Top-1 for each ``knn.k`` on selection and test, with train as the memory."""
    cfg = ctx.config.knn
    bank_chunk = cfg.get("bank_chunk", DEFAULT_BANK_CHUNK)
    if bank_chunk <= 0:
        raise ConfigError(f"config.knn.bank_chunk={bank_chunk!r} must be positive (bank rows per "
                          "device chunk)")
    train = encoder_features(ctx, ctx.train, limit=ctx.train_limit)
    scores = {}
    for split in (ctx.selection, ctx.test):  # one split in the monitor: scored once
        key = (split.data_dir, split.split)
        if key not in scores:
            accuracy = knn_accuracy(train, encoder_features(ctx, split, limit=ctx.eval_limit),
                                    ks=cfg.k, temperature=cfg.temperature,
                                    num_classes=ctx.num_classes, bank_chunk=bank_chunk)
            scores[key] = {f"top1_k{k}": value for k, value in accuracy.items()}
    selection, test = (scores[(s.data_dir, s.split)] for s in (ctx.selection, ctx.test))
    return result(ctx, "knn", [], {"k": list(cfg.k), "temperature": cfg.temperature}, test,
                  selection=selection)
