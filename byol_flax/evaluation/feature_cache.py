"""Frozen features on disk: memory-mapped ``.npy`` files under the evaluation workdir.

ImageNet's features at 2048 dimensions are 10.5 GB in float32: more than a host wants to hold
twice, and an encoder pass worth skipping when another protocol (or a re-run) of the same encoder
reads the same split. An entry is keyed by the encoder's fingerprint, the split and the
evaluation view; a JSON sidecar, written last, records its shape, dtype and the sha256 of the
split's manifest, so a half-written entry or one of changed data is recomputed, never read.
Single-process and local directories only: elsewhere the cache steps aside and features stay in
memory.
"""

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from byol_flax.data.pipeline import OpenedSplit
from byol_flax.data.records import MANIFEST_NAME

SIDECAR_VERSION = 1


def manifest_sha256(opened: OpenedSplit) -> str:
    """Digest of the split's ``manifest.json``: it names every shard and its checksum."""
    return hashlib.sha256((epath.Path(opened.data_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def encoder_fingerprint(module: nnx.Module) -> str:
    """sha256 of a module's graph and every array of its state (weights and BatchNorm
    statistics): two encoders with equal fingerprints compute equal features."""
    graphdef, state = nnx.split(module)
    digest = hashlib.sha256(repr(graphdef).encode())
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def split_key(opened: OpenedSplit, config: ml_collections.ConfigDict, *, limit: int,
              resize_ratio: float, batch_size: int) -> dict[str, Any]:
    """Everything besides the encoder that decides a split's features: the records, the view,
    and the batch and device layout (XLA's kernels depend on shapes)."""
    count = min(limit, opened.num_records) if limit else opened.num_records
    return {"data_dir": str(opened.data_dir), "split": opened.split, "count": count,
            "image_size": config.data.image_size, "resize_ratio": resize_ratio,
            "batch_size": batch_size, "devices": jax.device_count(),
            "platform": jax.devices()[0].platform}


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclasses.dataclass
class CacheWriter:
    """An entry being written: ``features`` is a writable memory map; :meth:`commit` adds the
    labels and the sidecar, then reopens the entry read-only."""

    cache: "FeatureCache"
    key: dict[str, Any]
    features: np.memmap

    def commit(self, labels: np.ndarray, opened: OpenedSplit) -> tuple[np.ndarray, np.ndarray]:
        features_path, labels_path, sidecar = self.cache.paths(self.key)
        self.features.flush()
        shape, dtype = list(self.features.shape), str(self.features.dtype)
        del self.features
        os.replace(str(features_path) + ".partial.npy", features_path)
        np.save(labels_path, labels)
        record = {"version": SIDECAR_VERSION, "key": self.key, "shape": shape, "dtype": dtype,
                  "labels_shape": list(labels.shape), "manifest_sha256": manifest_sha256(opened)}
        temporary = sidecar.parent / (sidecar.name + ".tmp")
        temporary.write_text(json.dumps(record, sort_keys=True, default=str, indent=1))
        os.replace(temporary, sidecar)
        logging.info("features of %s/%s cached in %s", opened.data_dir, opened.split,
                     features_path)
        return self.cache.load(self.key, opened)


class FeatureCache:
    """Features by key under ``directory`` (created on first write)."""

    def __init__(self, directory: epath.PathLike):
        self.directory = epath.Path(directory)

    def usable(self) -> bool:
        """Memory maps need a local file, and one writer: a single process."""
        return "://" not in str(self.directory) and jax.process_count() == 1

    def paths(self, key: Mapping[str, Any]) -> tuple[epath.Path, epath.Path, epath.Path]:
        stem = self.directory / _digest(key)
        return (stem.parent / (stem.name + ".features.npy"),
                stem.parent / (stem.name + ".labels.npy"), stem.parent / (stem.name + ".json"))

    def load(self, key: Mapping[str, Any], opened: OpenedSplit
             ) -> tuple[np.ndarray, np.ndarray] | None:
        """(read-only memory-mapped features, labels) when an entry for ``key`` is complete and
        matches its sidecar and the split's current manifest; None otherwise."""
        features_path, labels_path, sidecar = self.paths(key)
        if not sidecar.exists():
            return None
        try:
            record = json.loads(sidecar.read_text())
            features = np.load(features_path, mmap_mode="r")
            labels = np.load(labels_path)
        except (OSError, ValueError) as error:
            logging.warning("feature cache entry %s unreadable (%s): recomputed", sidecar, error)
            return None
        expected = json.loads(json.dumps(dict(key), sort_keys=True, default=str))
        if (record.get("version") != SIDECAR_VERSION or record.get("key") != expected
                or record.get("shape") != list(features.shape)
                or record.get("dtype") != str(features.dtype)
                or record.get("labels_shape") != list(labels.shape)
                or record.get("manifest_sha256") != manifest_sha256(opened)):
            logging.warning("feature cache entry %s does not match its sidecar or the data: "
                            "recomputed", sidecar)
            return None
        return features, labels

    def writer(self, key: Mapping[str, Any], shape: tuple[int, ...], dtype: Any) -> CacheWriter:
        """A new entry's memory-mapped features file, complete once committed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        features_path, _, sidecar = self.paths(key)
        if sidecar.exists():
            sidecar.unlink()  # a stale entry: invalid until the new one is committed
        features = np.lib.format.open_memmap(str(features_path) + ".partial.npy", mode="w+",
                                             dtype=dtype, shape=shape)
        return CacheWriter(self, json.loads(json.dumps(dict(key), sort_keys=True, default=str)),
                           features)
