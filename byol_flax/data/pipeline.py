"""Grain input pipelines over the ArrayRecord shards written by ``byol_flax/data/convert/``.

Training: source indices -> seeded global shuffle (reseeded every epoch) -> repeat -> read +
decode -> two host-side views (random resized crop + flip, T and T') -> this process's rows of
each global batch -> batch -> prefetch in ``worker_count`` processes (lazily: a process only
reads and decodes its own rows). Each process yields its own rows of the
global batch; :func:`byol_flax.sharding.shard_batch` turns them into one global ``jax.Array``.

Every random choice is a function of (seed, epoch, index), and the training stream starts at a
position in the global stream (examples consumed so far) rather than from a saved Grain iterator
state: a run resumed with another worker count or process count reads exactly the global batches
an uninterrupted run would have read.
"""

import bisect
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from byol_flax.data import augment
from byol_flax.data.records import (
    DataError,
    Manifest,
    decode_record,
    load_manifest,
    shard_paths,
    split_info,
    verify_split,
)
from byol_flax.data.staging import is_verified_copy, resolve_data_dir

# How far a skipped (undecodable) record looks for a replacement before giving up.
MAX_REPLACEMENT_HOPS = 64

# Splits whose shard checksums this process has already verified: the training loop and the
# online monitors open the same split, and hashing ImageNet twice at start-up costs minutes.
_CHECKSUMMED: set[tuple[str, str, tuple[str, ...]]] = set()


@dataclasses.dataclass(frozen=True)
class OpenedSplit:
    """A validated split: its manifest, shard paths and per-shard record counts."""

    data_dir: str
    split: str
    manifest: Manifest
    paths: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def num_records(self) -> int:
        return sum(self.counts)

    def locate(self, index: int) -> tuple[str, int]:
        """Global record index -> (shard file, index within the shard), for error messages."""
        ends = list(itertools.accumulate(self.counts))
        shard = bisect.bisect_right(ends, index)
        return self.paths[shard], index - (ends[shard - 1] if shard else 0)


def open_split(data_config: ml_collections.ConfigDict, split: str) -> OpenedSplit:
    """Loads the manifest and validates every shard of ``split`` before anything trains.

    Fails with :class:`DataError` naming the directory, file or value: missing directory or
    manifest, missing/empty/truncated/corrupt shard, or a manifest that disagrees with the config
    (number of classes, image size when the converter recorded one).
    """
    if not data_config.dir:
        raise DataError("config.data.dir is empty: point it at a directory written by "
                        "byol_flax/data/convert/")
    data_dir = resolve_data_dir(data_config.dir, data_config.local_cache_dir)
    manifest = load_manifest(data_dir)
    checksummed = (str(data_dir), split, tuple(
        shard.sha256 for shard in split_info(manifest, split, data_dir=data_dir).shards))
    verify_split(data_dir, manifest, split,  # counts and sizes are always re-checked (cheap)
                 checksum=data_config.verify_checksums and checksummed not in _CHECKSUMMED
                 and not is_verified_copy(data_dir))  # a staged gs:// copy hashed when copied
    if data_config.verify_checksums:
        _CHECKSUMMED.add(checksummed)
    if data_config.num_classes and manifest.num_classes != data_config.num_classes:
        raise DataError(f"config.data.num_classes={data_config.num_classes} but the manifest in "
                        f"{data_config.dir} has {manifest.num_classes} label names")
    recorded_size = manifest.source.get("image_size")
    expected_size = data_config.source_image_size
    if expected_size and recorded_size and tuple(recorded_size) != tuple(expected_size):
        raise DataError(f"config.data.source_image_size={tuple(expected_size)} but the manifest "
                        f"in {data_config.dir} records image_size={tuple(recorded_size)}")
    info = split_info(manifest, split, data_dir=data_dir)
    paths = tuple(str(p) for p in shard_paths(data_dir, manifest, split))
    return OpenedSplit(str(epath.Path(data_dir)), split, manifest, paths,
                       tuple(s.num_records for s in info.shards))


class _ReadExample:
    """Reads and decodes record ``index``; optionally replaces undecodable records.

    With ``allow_skips`` an undecodable record is replaced by the next decodable one (a
    deterministic choice, so resumes agree) and counted in the example's ``skipped`` field; the
    training loop bounds the total. Without it, the error names the shard and record index.
    """

    def __init__(self, opened: OpenedSplit, allow_skips: bool):
        self._opened = opened
        self._source = grain.sources.ArrayRecordDataSource(list(opened.paths))
        self._allow_skips = allow_skips

    def read(self, index: int, decode: Callable[[bytes], Any] = augment.decode_image):
        """(record, ``decode(record.image)``, records skipped)."""
        for hop in range(MAX_REPLACEMENT_HOPS):
            candidate = (index + hop) % self._opened.num_records
            try:
                record = decode_record(self._source[candidate])
                return record, decode(record.image), hop
            except Exception as error:
                shard, local = self._opened.locate(candidate)
                message = f"record {local} of shard {shard} cannot be decoded: {error!r}"
                if not self._allow_skips:
                    raise DataError(message + " (set config.data.max_skipped_records > 0 to "
                                    "skip such records)") from error
                logging.warning("skipping %s", message)
        raise DataError(f"{MAX_REPLACEMENT_HOPS} consecutive undecodable records from index "
                        f"{index} in {self._opened.data_dir}")


class TrainExample(grain.transforms.RandomMap):
    """Index -> {"view1", "view2"} uint8 crops (T, T'), plus label, index and skip count."""

    def __init__(self, opened: OpenedSplit, image_size: int, config: ml_collections.ConfigDict,
                 allow_skips: bool):
        self._reader = _ReadExample(opened, allow_skips)
        self._size = image_size
        self._config = config

    def random_map(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        config = self._config
        if config.get("crop_reduced_decode", False):
            draws = []

            def reduction(width: int, height: int) -> int:  # the draws need only the size
                draws[:] = [augment.sample_view(width, height, rng, config, view)
                            for view in (config.view1, config.view2)]
                return augment.decode_reduction([box for box, _ in draws], self._size)

            record, (image, scale), skipped = self._reader.read(
                int(index), functools.partial(augment.decode_image_reduced, reduction=reduction))
            view1, view2 = (augment.render_view(image, box, flip, self._size, scale)
                            for box, flip in draws)
        else:
            record, image, skipped = self._reader.read(int(index))
            view1, view2 = (augment.train_view(image, self._size, rng, config, view)
                            for view in (config.view1, config.view2))
        return {
            "view1": view1,
            "view2": view2,
            "label": np.int32(record.label),
            "index": np.int64(index),
            "skipped": np.int32(skipped),
        }


class EvalExample(grain.transforms.Map):
    """Index -> {"image"} resized + center-cropped (Appendix C), label, index."""

    def __init__(self, opened: OpenedSplit, image_size: int,
                 resize_ratio: float = augment.EVAL_RESIZE_RATIO):
        self._reader = _ReadExample(opened, allow_skips=False)
        self._size = image_size
        self._resize_ratio = resize_ratio

    def map(self, index: int) -> dict[str, Any]:
        record, image, _ = self._reader.read(int(index))
        return {"image": augment.eval_view(image, self._size, self._resize_ratio),
                "label": np.int32(record.label), "index": np.int64(index)}


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"{process_count} processes")
    return global_batch_size // process_count


# How often a Grain worker checks that the process that started it is alive.
PARENT_CHECK_SECONDS = 1.0


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # noqa: SLF001 - the trainer died (e.g. kill -9): free the worker's memory now


def exit_with_parent(worker_index: int, worker_count: int, *, trainer_pid: int) -> None:
    """Grain worker initialiser (bind ``trainer_pid=os.getpid()`` in the trainer with
    ``functools.partial``): the worker exits when the trainer that started it dies, even by
    kill -9 (no clean-up runs then, and each worker holds hundreds of MB of decoded images).
    The trainer's pid is bound, not read here: a worker still starting when the trainer dies
    already has another parent and must exit too."""
    del worker_index, worker_count
    threading.Thread(target=_watch_parent, args=(trainer_pid,), daemon=True,
                     name="exit-with-parent").start()


def _prefetch(ds: grain.MapDataset, data_config: ml_collections.ConfigDict) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                              prefetch_buffer_size=data_config.prefetch_buffer_size))
    if data_config.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count),
                            worker_init_fn=functools.partial(exit_with_parent,
                                                             trainer_pid=os.getpid()))
    return it


class _ProcessRows(grain.transforms.Map):
    """Local example i -> the global stream element this process owns at that position.

    Process p owns rows [p L, (p + 1) L) of every global batch of G = P L examples, so the
    global batch assembled from all processes is, row for row, the batch a single process
    would read: same examples, same crops, same per-row augmentation keys on the device.
    """

    def __init__(self, stream: grain.MapDataset, process_index: int, local_batch: int,
                 global_batch: int, start: int = 0):
        self._stream = stream
        self._offset = start + process_index * local_batch
        self._local = local_batch
        self._global = global_batch

    def map(self, local_index: int) -> dict[str, Any]:
        batch, row = divmod(int(local_index), self._local)
        return self._stream[batch * self._global + self._offset + row]


def _process_batches(stream: grain.MapDataset, data_config: ml_collections.ConfigDict, *,
                     global_batch: int, process_index: int, process_count: int, start: int = 0
                     ) -> grain.IterDataset:
    """This process's rows of each global batch of ``stream`` from position ``start`` on,
    batched and prefetched."""
    local_batch = _local_batch_size(global_batch, process_count)
    rows = _ProcessRows(stream, process_index, local_batch, global_batch, start)
    ds = grain.MapDataset.range(len(stream) // process_count).map(rows)
    return _prefetch(ds.batch(local_batch, drop_remainder=True), data_config)


def train_dataset(config: ml_collections.ConfigDict, opened: OpenedSplit, *,
                  process_index: int = 0, process_count: int = 1,
                  examples_consumed: int = 0) -> grain.IterDataset:
    """The endless training stream of this process's rows of each global batch, starting after
    the first ``examples_consumed`` examples of the global stream (a resumed run's position).

    Randomness (order, crops, flips) is a function of the seed and the position in the global
    stream only, so the run does not depend on the number of processes or workers.
    """
    data_config = config.data
    stream = (grain.MapDataset.range(opened.num_records)
              .shuffle(seed=config.seed)
              .repeat(None, reseed_each_epoch=True)
              .random_map(TrainExample(opened, data_config.image_size, config.augment,
                                       allow_skips=data_config.max_skipped_records > 0),
                          seed=config.seed))
    return _process_batches(stream, data_config, global_batch=config.training.batch_size,
                            process_index=process_index, process_count=process_count,
                            start=examples_consumed)


class _Lookup(grain.transforms.Map):
    """Position -> record index, for training on a subset of a split."""

    def __init__(self, indices: np.ndarray):
        self._indices = indices

    def map(self, position: int) -> int:
        return int(self._indices[position])


class LabelledExample(grain.transforms.RandomMap):
    """Index -> {"image", "label"}: a random resized crop + flip (view T's flip probability) with
    ``augment``, else the evaluation view. The evaluation protocols' training input."""

    def __init__(self, opened: OpenedSplit, image_size: int,
                 augment_config: ml_collections.ConfigDict | None):
        self._reader = _ReadExample(opened, allow_skips=False)
        self._size = image_size
        self._config = augment_config

    def random_map(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        record, image, _ = self._reader.read(int(index))
        view = (augment.train_view(image, self._size, rng, self._config, self._config.view1)
                if self._config is not None else augment.eval_view(image, self._size))
        return {"image": view, "label": np.int32(record.label)}


def labelled_dataset(config: ml_collections.ConfigDict, opened: OpenedSplit, *,
                     indices: Sequence[int] | None, batch_size: int, augment: bool, seed: int,
                     process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless shuffled batches {"image", "label"} of the records ``indices`` (all if None),
    reshuffled every epoch, with spatial augmentation (``config.augment`` crops) or eval views."""
    indices = np.arange(opened.num_records) if indices is None else np.asarray(indices)
    stream = (grain.MapDataset.range(len(indices))
              .shuffle(seed=seed)
              .repeat(None, reseed_each_epoch=True)
              .map(_Lookup(indices))
              .random_map(LabelledExample(opened, config.data.image_size,
                                          config.augment if augment else None), seed=seed))
    return _process_batches(stream, config.data, global_batch=batch_size,
                            process_index=process_index, process_count=process_count)


def combine_splits(first: OpenedSplit, second: OpenedSplit) -> OpenedSplit:
    """Two splits of one dataset read as one (records of ``first`` then ``second``): the
    train + validation refit of Appendix E."""
    if first.data_dir != second.data_dir:
        raise DataError(f"cannot combine splits of {first.data_dir} and {second.data_dir}")
    return OpenedSplit(first.data_dir, f"{first.split}+{second.split}", first.manifest,
                       first.paths + second.paths, first.counts + second.counts)


class _LabelAndId(grain.transforms.Map):
    def __init__(self, opened: OpenedSplit):
        self._source = grain.sources.ArrayRecordDataSource(list(opened.paths))

    def map(self, index: int) -> tuple[int, str]:
        record = decode_record(self._source[int(index)])
        return record.label, record.id


def labels_and_ids(opened: OpenedSplit, data_config: ml_collections.ConfigDict
                   ) -> tuple[np.ndarray, list[str]]:
    """Every record's label and id, in order (no image decoding; threads read in parallel)."""
    ds = (grain.MapDataset.range(opened.num_records).map(_LabelAndId(opened))
          .to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads)))
    pairs = list(ds)
    return np.asarray([p[0] for p in pairs], np.int32), [p[1] for p in pairs]


def eval_dataset(config: ml_collections.ConfigDict, opened: OpenedSplit, *, batch_size: int,
                 limit: int = 0, process_index: int = 0, process_count: int = 1,
                 resize_ratio: float = augment.EVAL_RESIZE_RATIO) -> grain.IterDataset:
    """One ordered pass over the first ``limit`` records (all if 0), this process's slice; the
    last batch may be short."""
    count = min(limit, opened.num_records) if limit else opened.num_records
    ds = grain.MapDataset.range(count)[process_index::process_count]
    ds = ds.map(EvalExample(opened, config.data.image_size, resize_ratio)).batch(batch_size)
    return _prefetch(ds, config.data)


def views_only(batch: dict[str, np.ndarray], keys: Sequence[str] = ("view1", "view2")
               ) -> dict[str, np.ndarray]:
    """The part of a host batch that the train step consumes."""
    return {k: batch[k] for k in keys}
