"""The on-disk dataset format: ArrayRecord shards of msgpack records plus a JSON manifest.

This module is the one place that defines the format; ``byol_flax/data/convert/`` writes it and the
training input pipeline reads and validates it (a ``gs://`` dataset staged on local disk first:
:mod:`byol_flax.data.staging`).

Record schema (schema version 1), one msgpack map per record:

    {"image": bytes,   # the encoded image file as found (JPEG, PNG, ...); re-encoded only when
                       # the converter was asked to or the image has 16-bit samples (scaled to
                       # 8 bits); the manifest says so in both cases
     "label": int,     # class index into the manifest's label_names; -1 when unlabeled
     "id": str}        # stable identifier, e.g. the path relative to the source root

Directory layout:

    <data_dir>/manifest.json
    <data_dir>/<split>-<index:05d>-of-<count:05d>.array_record

Manifest (``manifest.json``):

    {"schema_version": 1,
     "dataset": "imagenet2012",
     "label_names": ["n01440764", ...],
     "source": {...free-form provenance: root, converter, options...},
     "splits": {"train": {"num_records": 1271158,
                          "shards": [{"file": "train-00000-of-01024.array_record",
                                      "num_records": 1242, "sha256": "..."}, ...]}, ...}}
"""

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from concurrent import futures
from typing import Any

import msgpack
from array_record.python import array_record_module
from etils import epath

from byol_flax.errors import UserError
from byol_flax.storage import files, json_files, schemas

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
UNLABELED = -1
# group_size:1 makes every record individually addressable: Grain reads records at random.
WRITER_OPTIONS = "group_size:1"


class DataError(UserError, ValueError):
    """A dataset on disk is missing, damaged or does not match what the config expects."""


@dataclasses.dataclass(frozen=True)
class Record:
    image: bytes
    label: int
    id: str


def encode_record(record: Record) -> bytes:
    return msgpack.packb({"image": record.image, "label": int(record.label), "id": record.id},
                         use_bin_type=True)


def decode_record(data: bytes) -> Record:
    fields = msgpack.unpackb(data, raw=False)
    return Record(image=fields["image"], label=int(fields["label"]), id=fields["id"])


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    file: str
    num_records: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_records: int
    shards: tuple[ShardInfo, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    dataset: str
    label_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, origin: str = "manifest") -> "Manifest":
        try:
            raw = json_files.loads(text, name=origin, spec=schemas.MANIFEST)
        except files.StorageError as error:
            raise DataError(f"{error}: not a valid byol_flax manifest") from None
        try:
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise DataError(f"{origin}: schema_version {raw.get('schema_version')!r} is not "
                                f"the supported version {SCHEMA_VERSION}")
            splits = {name: SplitInfo(split["num_records"],
                                      tuple(ShardInfo(**shard) for shard in split["shards"]))
                      for name, split in raw["splits"].items()}
            return cls(dataset=raw["dataset"], label_names=tuple(raw["label_names"]),
                       splits=splits, source=raw.get("source", {}),
                       schema_version=raw["schema_version"])
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise DataError(f"{origin} is not a valid byol_flax manifest: {error!r}") from error


def file_sha256(path: epath.PathLike, chunk_size: int = 1 << 22) -> str:
    return files.sha256(path, what="shard", chunk_bytes=chunk_size)


def write_shard(path: epath.PathLike, records: Iterable[Record]) -> ShardInfo:
    """Writes records to ``path`` atomically (temporary file, then rename) and describes it."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    files.check_writable(path, what="shard")
    files.check_writable(tmp, what="shard")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
    count = 0
    try:
        for record in records:
            writer.write(encode_record(record))
            count += 1
    finally:
        writer.close()
    files.replace(tmp, path, what="shard")  # atomic, and overwrites a stale shard
    return ShardInfo(file=path.name, num_records=count, sha256=file_sha256(path))


def count_records(path: epath.PathLike) -> int:
    """Number of records in an ArrayRecord file; damaged files raise :class:`DataError`."""
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        try:
            return reader.num_records()
        finally:
            reader.close()
    except (RuntimeError, ValueError, OSError) as error:
        # ArrayRecord raises an empty RuntimeError for some truncations: name the file.
        raise DataError(f"shard {path} is unreadable (truncated or not an ArrayRecord file): "
                        f"{error!r}") from error


def manifest_path(data_dir: epath.PathLike) -> epath.Path:
    return epath.Path(data_dir) / MANIFEST_NAME


def write_manifest(data_dir: epath.PathLike, manifest: Manifest) -> None:
    files.write_text(manifest_path(data_dir), manifest.to_json(), what="manifest")


def load_manifest(data_dir: epath.PathLike) -> Manifest:
    data_dir = epath.Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"data directory {data_dir} does not exist")
    path = manifest_path(data_dir)
    if not path.exists():
        raise DataError(f"{path} is missing: {data_dir} was not written by byol_flax/data/convert/ "
                        "(or the conversion did not finish)")
    try:
        text = files.read_text(path, what="manifest")
    except files.StorageError as error:
        raise DataError(str(error)) from None
    return Manifest.from_json(text, origin=str(path))


def split_info(manifest: Manifest, split: str, *, data_dir: epath.PathLike) -> SplitInfo:
    if split not in manifest.splits:
        raise DataError(f"split {split!r} is not in {manifest_path(data_dir)}; "
                        f"available: {sorted(manifest.splits)}")
    return manifest.splits[split]


def shard_paths(data_dir: epath.PathLike, manifest: Manifest, split: str) -> list[epath.Path]:
    return [epath.Path(data_dir) / shard.file
            for shard in split_info(manifest, split, data_dir=data_dir).shards]


def verify_shard(path: epath.PathLike, expected: ShardInfo, *, checksum: bool = True) -> None:
    """Raises :class:`DataError` naming ``path`` unless it exists and matches the manifest."""
    path = epath.Path(path)
    if not path.exists():
        raise DataError(f"shard {path} named by the manifest is missing")
    if path.stat().length == 0:
        raise DataError(f"shard {path} is empty (0 bytes)")
    if checksum and (actual := file_sha256(path)) != expected.sha256:
        raise DataError(f"shard {path} is corrupt: sha256 {actual[:16]}... does not match the "
                        f"manifest's {expected.sha256[:16]}...")
    if (count := count_records(path)) != expected.num_records:
        raise DataError(f"shard {path} holds {count} records, the manifest says "
                        f"{expected.num_records}")


def verify_split(data_dir: epath.PathLike, manifest: Manifest, split: str, *,
                 checksum: bool = True, workers: int = 8) -> None:
    """Checks every shard of ``split`` (in parallel threads: hashing is I/O and C code)."""
    info = split_info(manifest, split, data_dir=data_dir)
    paths = shard_paths(data_dir, manifest, split)
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for result in [pool.submit(verify_shard, p, s, checksum=checksum)
                       for p, s in zip(paths, info.shards)]:
            result.result()
    if sum(s.num_records for s in info.shards) != info.num_records:
        raise DataError(f"{manifest_path(data_dir)}: split {split!r} shard counts do not add up "
                        f"to num_records={info.num_records}")


def split_evenly(items: Sequence[Any], num_shards: int) -> list[Sequence[Any]]:
    """Deterministic contiguous assignment of items to shards, sizes differing by at most one."""
    base, extra = divmod(len(items), num_shards)
    bounds, start = [], 0
    for index in range(num_shards):
        end = start + base + (index < extra)
        bounds.append(items[start:end])
        start = end
    return bounds
