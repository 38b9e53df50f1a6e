"""Frozen features on disk: memory-mapped ``.npy`` files under the evaluation workdir.

ImageNet's features at 2048 dimensions are 10.5 GB in float32: more than a host wants to hold
twice, and an encoder pass worth skipping when another protocol (or a re-run, in another
process) of the same encoder reads the same split. One entry per split and view (the file names
are a digest of :func:`split_key`); a JSON sidecar, written last, records the full key (the
encoder's fingerprint included), shapes, dtypes, the sha256 of the split's manifest and of both
array files. An entry is read only when all of them match: a half-written entry, one of changed
data or another encoder, and one whose bytes were altered are recomputed (the last with a
warning) and replace the old entry, so a workdir holds one copy per split and view. Files are
created by the storage layer (never through a planted link) and read only when they are regular
files. Single-process and local directories only: elsewhere the cache steps aside and features
stay in memory.
"""

import dataclasses
import hashlib
import io
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
from byol_flax.storage import files, json_files, schemas

SIDECAR_VERSION = 2
SIDECAR_MAX_BYTES = 1 << 20


def manifest_sha256(opened: OpenedSplit) -> str:
    """Digest of the split's ``manifest.json``: it names every shard and its checksum."""
    return hashlib.sha256(files.read_bytes(epath.Path(opened.data_dir) / MANIFEST_NAME,
                                           what="manifest")).hexdigest()


def _structure(module: nnx.Module) -> list[str]:
    """The module tree as paths and class names: what ``repr(graphdef)`` says of the
    architecture, without its memory addresses (which differ in every process)."""
    return [f"{'/'.join(map(str, path))}:{type(node).__module__}.{type(node).__qualname__}"
            for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)]


def encoder_fingerprint(module: nnx.Module, architecture: Mapping[str, Any] | None = None
                        ) -> str:
    """sha256 of an encoder's architecture (``architecture``: its model config, when known;
    its module tree) and every array of its state (weights and BatchNorm statistics), in a
    fixed order: equal in every process for equal encoders, which compute equal features."""
    digest = hashlib.sha256(json.dumps(
        {"architecture": architecture, "modules": _structure(module)}, sort_keys=True,
        default=str).encode())
    state = nnx.to_pure_dict(nnx.state(module))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
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


def _plain(key: Mapping[str, Any]) -> dict[str, Any]:
    """``key`` as its JSON round trip (what the sidecar holds and is compared with)."""
    return json.loads(json.dumps(dict(key), sort_keys=True, default=str))


@dataclasses.dataclass
class CacheWriter:
    """An entry being written: ``features`` is a writable memory map; :meth:`commit` adds the
    labels and the sidecar, then reopens the features read-only (without hashing them again:
    they were hashed for the sidecar a moment before)."""

    cache: "FeatureCache"
    key: dict[str, Any]
    features: np.memmap

    def commit(self, labels: np.ndarray, opened: OpenedSplit) -> tuple[np.ndarray, np.ndarray]:
        features_path, labels_path, sidecar = self.cache.paths(self.key)
        self.features.flush()
        shape, dtype = list(self.features.shape), str(self.features.dtype)
        del self.features
        files.replace(str(features_path) + ".partial.npy", features_path, what="feature file")
        buffer = io.BytesIO()
        np.save(buffer, labels, allow_pickle=False)
        files.write_bytes(labels_path, buffer.getvalue(), what="feature labels")
        record = {"version": SIDECAR_VERSION, "key": self.key, "shape": shape, "dtype": dtype,
                  "labels_shape": list(labels.shape), "manifest_sha256": manifest_sha256(opened),
                  "features_sha256": files.sha256(features_path),
                  "labels_sha256": files.sha256(labels_path)}
        json_files.write(sidecar, record, sort_keys=True, default=str, indent=1,
                         what="feature cache sidecar")
        logging.info("features of %s/%s cached in %s", opened.data_dir, opened.split,
                     features_path)
        return np.load(os.fspath(features_path), mmap_mode="r", allow_pickle=False), labels


class FeatureCache:
    """Features by key under ``directory`` (created on first write)."""

    def __init__(self, directory: epath.PathLike):
        self.directory = epath.Path(directory)

    def usable(self) -> bool:
        """Memory maps need a local file, and one writer: a single process."""
        return not files.is_remote(self.directory) and jax.process_count() == 1

    def paths(self, key: Mapping[str, Any]) -> tuple[epath.Path, epath.Path, epath.Path]:
        """(features, labels, sidecar) of ``key``'s entry: named by the split and view alone, so
        another encoder's features of the same split replace an old entry, not add one."""
        stem = self.directory / _digest({k: v for k, v in key.items() if k != "encoder"})
        return (stem.parent / (stem.name + ".features.npy"),
                stem.parent / (stem.name + ".labels.npy"), stem.parent / (stem.name + ".json"))

    def load(self, key: Mapping[str, Any], opened: OpenedSplit
             ) -> tuple[np.ndarray, np.ndarray] | None:
        """(read-only memory-mapped features, labels) when the entry for ``key`` is complete and
        matches its sidecar (key, shapes, checksums) and the split's current manifest; None
        otherwise."""
        features_path, labels_path, sidecar = self.paths(key)
        if not files.exists(sidecar):
            return None
        try:
            for path in (sidecar, features_path, labels_path):
                files.check_regular(path, follow_links=False, what="feature cache file")
            record = json_files.read(sidecar, spec=schemas.FEATURE_CACHE_ENTRY,
                                     what="feature cache sidecar", max_bytes=SIDECAR_MAX_BYTES)
        except OSError as error:
            logging.warning("feature cache entry %s unreadable (%s): recomputed", sidecar, error)
            return None
        if record["version"] != SIDECAR_VERSION or record["key"] != _plain(key):
            logging.info("feature cache entry %s is of another encoder or view: recomputed",
                         sidecar)
            return None
        try:
            unchanged = (record["features_sha256"] == files.sha256(features_path)
                         and record["labels_sha256"] == files.sha256(labels_path))
            features = np.load(os.fspath(features_path), mmap_mode="r", allow_pickle=False)
            labels = np.load(os.fspath(labels_path), allow_pickle=False)
        except (OSError, ValueError) as error:
            logging.warning("feature cache entry %s unreadable (%s): recomputed", sidecar, error)
            return None
        if not unchanged or (
                record["shape"] != list(features.shape) or record["dtype"] != str(features.dtype)
                or record["labels_shape"] != list(labels.shape)
                or record["manifest_sha256"] != manifest_sha256(opened)):
            logging.warning("feature cache entry %s does not match its sidecar's checksums, "
                            "shapes or the data's manifest: recomputed", sidecar)
            return None
        logging.info("features of %s/%s read from the cache %s", opened.data_dir, opened.split,
                     features_path)
        return features, labels

    def writer(self, key: Mapping[str, Any], shape: tuple[int, ...], dtype: Any) -> CacheWriter:
        """A new entry's memory-mapped features file, complete once committed; the split's old
        entry is removed first (its sidecar first: invalid from then on)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        features_path, labels_path, sidecar = self.paths(key)
        for path in (sidecar, features_path, labels_path):
            files.remove(path, what="feature cache file")  # a planted link too, never followed
        partial = str(features_path) + ".partial.npy"
        files.create_exclusive(partial, what="feature file")
        features = np.lib.format.open_memmap(partial, mode="w+",
                                             dtype=dtype, shape=shape)
        return CacheWriter(self, _plain(key), features)
