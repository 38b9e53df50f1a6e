"""Frozen features of a labelled split: one ordered pass, every process, every device.

Shared by every protocol, as a training monitor or offline (linear on precomputed features, kNN,
transfer via L-BFGS). Batches are padded to a fixed size so the embedding function compiles once,
and every process runs the same number of batches because the gathers are collectives. Features
stream into one preallocated array (in memory, or a memory-mapped file of a
:class:`~byol_flax.evaluation.feature_cache.FeatureCache`): the split's images are never held at
once, and the features never twice.
"""

import contextlib
import contextvars
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import byol_flax.evaluation.classifier as clf
from byol_flax.data.augment import EVAL_RESIZE_RATIO
from byol_flax.data.pipeline import OpenedSplit, eval_dataset
from byol_flax.evaluation.feature_cache import FeatureCache, encoder_fingerprint, split_key
from byol_flax.sharding import shard_batch

# (weights, uint8 images sharded over the mesh) -> features (B, D).
EmbedFn = Callable[[Any, jax.Array], jax.Array]
Features = tuple[np.ndarray, np.ndarray]


def extract_features(embed: EmbedFn, weights: Any, opened: OpenedSplit,
                     config: ml_collections.ConfigDict, mesh: Mesh, *, batch_size: int,
                     limit: int = 0, resize_ratio: float = EVAL_RESIZE_RATIO,
                     cache: FeatureCache | None = None,
                     encoder_key: Mapping[str, Any] | None = None) -> Features:
    """(features, labels) of the first ``limit`` records of ``opened`` (all if 0), in order.

    ``batch_size`` is global and must be a multiple of the device count. Images are the
    evaluation view: shorter side resized to ``image_size * resize_ratio``, centre crop. With a
    ``cache`` and the ``encoder_key`` that identifies ``weights`` (its fingerprint), features
    are read from the cache when it holds them and written to it otherwise (a memory map).
    """
    count = min(limit, opened.num_records) if limit else opened.num_records
    key = None
    if cache is not None and encoder_key is not None and cache.usable():
        key = {"encoder": dict(encoder_key), **split_key(opened, config, limit=limit,
                                                         resize_ratio=resize_ratio,
                                                         batch_size=batch_size)}
        hit = cache.load(key, opened)
        if hit is not None:
            return hit
    rows = _feature_rows(embed, weights, opened, config, mesh, batch_size=batch_size,
                         limit=limit, resize_ratio=resize_ratio)
    features = labels = None
    writer = None
    start = 0
    for out, label in rows:
        if features is None:
            if key is not None:
                writer = cache.writer(key, (count, *out.shape[1:]), out.dtype)
                features = writer.features
            else:
                features = np.empty((count, *out.shape[1:]), out.dtype)
            labels = np.empty(count, label.dtype)
        features[start:start + len(out)], labels[start:start + len(out)] = out, label
        start += len(out)
    if features is None:  # an empty split: nothing to write
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int32)
    if writer is not None:
        return writer.commit(labels, opened)
    return features, labels


def _feature_rows(embed: EmbedFn, weights: Any, opened: OpenedSplit,
                  config: ml_collections.ConfigDict, mesh: Mesh, *, batch_size: int, limit: int,
                  resize_ratio: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of each global batch's valid rows, in the order of the pass."""
    process_count = jax.process_count()
    local_batch = batch_size // process_count
    count = min(limit, opened.num_records) if limit else opened.num_records
    per_process = -(-count // process_count)
    num_batches = -(-per_process // local_batch)
    size = config.data.image_size
    batches = iter(eval_dataset(config, opened, batch_size=local_batch, limit=limit,
                                process_index=jax.process_index(), process_count=process_count,
                                resize_ratio=resize_ratio))
    for _ in range(num_batches):
        batch = next(batches, None)
        n = 0 if batch is None else len(batch["label"])
        images = np.zeros((local_batch, size, size, 3), np.uint8)
        label = np.zeros(local_batch, np.int32)
        valid = np.arange(local_batch) < n
        if n:
            images[:n], label[:n] = batch["image"], batch["label"]
        out = embed(weights, shard_batch(images, mesh))
        gathered = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        mask = np.asarray(multihost_utils.process_allgather(valid, tiled=True))
        label = np.asarray(multihost_utils.process_allgather(label, tiled=True))
        yield gathered[mask], label[mask]


class FeatureStore:
    """Features of one encoder by split and view, extracted once and handed to every reader:
    the protocols of one evaluation, or the monitor evaluators of one training step. With a
    :class:`FeatureCache` they are kept on disk too, for other protocols and re-runs."""

    def __init__(self, cache: FeatureCache | None = None):
        self.cache = cache
        self.extractions = 0  # encoder passes run: the sharing is tested and logged by it
        self._held: dict[str, Features] = {}

    def features(self, encoder: nnx.Module, opened: OpenedSplit,
                 config: ml_collections.ConfigDict, mesh: Mesh, *, identity: str,
                 limit: int = 0, resize_ratio: float = EVAL_RESIZE_RATIO,
                 architecture: Mapping[str, Any] | None = None) -> Features:
        """``encoder``'s features of ``opened`` (``identity`` names the encoder: one store may
        serve several subjects with distinct identities; ``architecture``, its model config,
        keys the disk cache beside the weights)."""
        key = json.dumps([identity, str(opened.data_dir), opened.split, limit, resize_ratio,
                          config.data.image_size, config.feature_batch_size])
        if key not in self._held:
            apply, state = clf.make_inference_fn(encoder, mesh)
            use_cache = self.cache is not None and self.cache.usable()
            encoder_key = ({"fingerprint": encoder_fingerprint(encoder, architecture)}
                           if use_cache else None)
            self._held[key] = extract_features(
                apply, state, opened, config, mesh, batch_size=config.feature_batch_size,
                limit=limit, resize_ratio=resize_ratio, cache=self.cache if use_cache else None,
                encoder_key=encoder_key)
            self.extractions += 1
        return self._held[key]


_SHARED: contextvars.ContextVar[FeatureStore | None] = contextvars.ContextVar(
    "byol_flax_shared_features", default=None)


@contextlib.contextmanager
def sharing_features(store: FeatureStore) -> Iterator[FeatureStore]:
    """Within the block, :func:`encoder_features` reads ``store``: the monitor opens one per
    step, where every evaluator's subject is the same live encoder."""
    token = _SHARED.set(store)
    try:
        yield store
    finally:
        _SHARED.reset(token)


def encoder_features(ctx: Any, opened: OpenedSplit, *, limit: int = 0,
                     resize_ratio: float = EVAL_RESIZE_RATIO) -> Features:
    """Features of ``ctx``'s encoder (a :class:`byol_flax.evaluation.base.Context`): from the
    store :func:`sharing_features` made active, else the context's own."""
    store = _SHARED.get()
    if store is None:
        return ctx.features(opened, limit=limit, resize_ratio=resize_ratio)
    return store.features(ctx.pretrained.encoder, opened, ctx.config, ctx.mesh,
                          identity=ctx.identity, limit=limit, resize_ratio=resize_ratio,
                          architecture=ctx.pretrained.model_config)
