"""Frozen features of a labelled split: one ordered pass, every process, every device.

Shared by every protocol, as a training monitor or offline (linear on precomputed features, kNN,
transfer via L-BFGS). Batches are padded to a fixed size so the embedding function compiles once,
and every process runs the same number of batches because the gathers are collectives.
"""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from byol_flax.data.augment import EVAL_RESIZE_RATIO
from byol_flax.data.pipeline import OpenedSplit, eval_dataset
from byol_flax.sharding import shard_batch

# (weights, uint8 images sharded over the mesh) -> features (B, D).
EmbedFn = Callable[[Any, jax.Array], jax.Array]


def extract_features(embed: EmbedFn, weights: Any, opened: OpenedSplit,
                     config: ml_collections.ConfigDict, mesh: Mesh, *, batch_size: int,
                     limit: int = 0, resize_ratio: float = EVAL_RESIZE_RATIO
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the first ``limit`` records of ``opened`` (all if 0), in order.

    ``batch_size`` is global and must be a multiple of the device count. Images are the
    evaluation view: shorter side resized to ``image_size * resize_ratio``, centre crop.
    """
    process_count = jax.process_count()
    local_batch = batch_size // process_count
    count = min(limit, opened.num_records) if limit else opened.num_records
    per_process = -(-count // process_count)
    num_batches = -(-per_process // local_batch)
    size = config.data.image_size
    batches = iter(eval_dataset(config, opened, batch_size=local_batch, limit=limit,
                                process_index=jax.process_index(), process_count=process_count,
                                resize_ratio=resize_ratio))
    features, labels = [], []
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
        features.append(gathered[mask])
        labels.append(label[mask])
    return np.concatenate(features), np.concatenate(labels)
