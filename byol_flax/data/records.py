"""The on-disk dataset format: ArrayRecord shards of msgpack records plus a JSON manifest.

This module is the one place that defines the format; ``byol_flax/data/convert/`` writes it and the
training input pipeline reads and validates it.

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
import datetime
import fcntl
import hashlib
import json
import os
import shutil
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
    os.replace(tmp, path)  # atomic, and overwrites a stale shard
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


SUPPORTED_REMOTE_SCHEMES = ("gs",)


# A copy whose shards were hashed against its manifest carries this stamp; a restart that finds
# it, for the source's current manifest, neither copies nor hashes again.
VERIFIED_COPY_STAMP = ".verified_copy.json"
# Free space wanted beyond the files themselves: the manifest, the stamp, and slack so that the
# copy does not fill the disk other writers (checkpoints, logs) share.
COPY_FREE_SPACE_MARGIN = 1_000_000_000
_GB = 1e9


_STAMP = schemas.Obj({"manifest_sha256": str})


def _bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified_manifest_sha256(local_dir: os.PathLike | str) -> str | None:
    """The manifest sha256 in ``local_dir``'s stamp, if it is that of the manifest beside it."""
    local_dir = epath.Path(local_dir)
    try:
        stamp = json_files.read(local_dir / VERIFIED_COPY_STAMP, spec=_STAMP,
                                what="verified-copy stamp", max_bytes=1 << 16)
        manifest = files.read_bytes(manifest_path(local_dir), what="manifest")
    except OSError:  # absent, damaged or not a file: not a verified copy
        return None
    recorded = stamp["manifest_sha256"]
    return recorded if recorded == _bytes_sha256(manifest) else None


def is_verified_copy(local_dir: epath.PathLike) -> bool:
    """Whether ``local_dir`` is a copy whose shards were sha256-verified when it was made.

    True when its stamp names the sha256 of the manifest beside it: the input pipeline may then
    skip hashing the shards again (counts and sizes are cheap and still worth checking).
    """
    return _verified_manifest_sha256(local_dir) is not None


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_free_space(needed: int, source: epath.Path, destination: str) -> None:
    """Fails, giving both sizes, unless the destination's disk has room for ``needed`` bytes."""
    free = shutil.disk_usage(_existing_parent(destination)).free
    if free < needed + COPY_FREE_SPACE_MARGIN:
        raise DataError(f"not enough disk space to copy {source} to {destination}: it needs "
                        f"{needed / _GB:.2f} GB (+ {COPY_FREE_SPACE_MARGIN / _GB:.2f} GB margin), "
                        f"{free / _GB:.2f} GB are free; point config.data.local_cache_dir at a "
                        "larger disk")


def _clear_old_copy(destination: str, partial: str, names: set[str]) -> None:
    """Moves the shards of an unverified old copy into ``partial``, then removes the rest.

    Only files a copy writes are touched: a destination holding anything else is refused.
    """
    if not os.path.isdir(destination):
        return
    ours = names | {MANIFEST_NAME, VERIFIED_COPY_STAMP}
    if others := sorted(n for n in os.listdir(destination) if n.removesuffix(".tmp") not in ours):
        raise DataError(f"{destination} holds files that are not this dataset's (e.g. "
                        f"{others[0]!r}): not replacing it; empty it or choose another "
                        "config.data.local_cache_dir")
    for name in os.listdir(destination):
        old, new = os.path.join(destination, name), os.path.join(partial, name)
        if name in names and not os.path.exists(new):
            os.replace(old, new)  # kept only if its sha256 matches the manifest
        else:
            os.remove(old)
    os.rmdir(destination)


def _copy_shard(source: epath.Path, partial: str, shard: ShardInfo, size: int) -> None:
    """Puts a verified copy of ``shard`` in ``partial``; a kept file is copied again if bad."""
    path = os.path.join(partial, shard.file)
    if os.path.isfile(path) and os.path.getsize(path) == size:
        try:
            return verify_shard(path, shard)
        except DataError:
            pass  # an old or damaged file: copy it again
    tmp = epath.Path(path + ".tmp")
    (source / shard.file).copy(tmp, overwrite=True)
    os.replace(tmp, path)
    verify_shard(path, shard)  # a fresh copy that does not match: the source is bad


def copy_dataset(source: epath.PathLike, destination: epath.PathLike,
                 workers: int = 8) -> epath.Path:
    """Copies ``manifest.json`` and every shard it names to the local ``destination``, verified.

    A destination stamped as a verified copy of the source's current manifest is used as it is:
    a restart copies and hashes nothing. Otherwise the shards go to ``<destination>.partial``
    after a free-space check, each is sha256-checked against the manifest, the directory is
    stamped and renamed to ``destination``. A killed copy therefore never looks complete, and
    the next start resumes it (files already there are hashed, not copied). Processes of one
    host take turns (a lock file beside the destination): the first copies, the others find
    its stamp.
    """
    source = epath.Path(source)
    destination = os.path.abspath(os.fspath(destination))
    try:
        manifest_bytes = files.read_bytes(manifest_path(source), what="manifest")
    except OSError as error:
        raise DataError(f"{manifest_path(source)} cannot be read: {error}") from error
    manifest_sha256 = _bytes_sha256(manifest_bytes)
    if _verified_manifest_sha256(destination) == manifest_sha256:
        return epath.Path(destination)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with files.open_append(destination + ".lock", what="lock file") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if _verified_manifest_sha256(destination) != manifest_sha256:
            _copy_verified(source, destination, manifest_bytes, workers)
    return epath.Path(destination)


def _copy_verified(source: epath.Path, destination: str, manifest_bytes: bytes,
                   workers: int) -> None:
    """The copy itself (see copy_dataset), under its lock."""
    manifest = Manifest.from_json(manifest_bytes.decode("utf-8", "replace"),
                                  origin=str(manifest_path(source)))
    shards = [shard for split in manifest.splits.values() for shard in split.shards]
    partial = destination + ".partial"
    os.makedirs(partial, exist_ok=True)
    _clear_old_copy(destination, partial, {shard.file for shard in shards})

    sizes = {}
    for shard in shards:
        if not (src := source / shard.file).exists():
            raise DataError(f"shard {src} named by the manifest is missing")
        sizes[shard.file] = src.stat().length
    kept = {shard.file for shard in shards
            if os.path.isfile(path := os.path.join(partial, shard.file))
            and os.path.getsize(path) == sizes[shard.file]}
    _check_free_space(sum(size for name, size in sizes.items() if name not in kept)
                      + len(manifest_bytes), source, destination)
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:  # I/O and hashing in C
        for done in [pool.submit(_copy_shard, source, partial, shard, sizes[shard.file])
                     for shard in shards]:
            done.result()
    # The bytes hashed above, even if the source changed since.
    files.write_bytes(os.path.join(partial, MANIFEST_NAME), manifest_bytes, what="manifest")
    for split in manifest.splits:
        verify_split(partial, manifest, split, checksum=False)  # the counts add up
    json_files.write(os.path.join(partial, VERIFIED_COPY_STAMP),
                     {"source": str(source), "manifest_sha256": _bytes_sha256(manifest_bytes),
                      "verified_at": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                     what="verified-copy stamp")
    os.replace(partial, destination)  # destination was cleared above: an atomic rename


def resolve_data_dir(data_dir: str, local_cache_dir: str) -> str:
    """A local directory holding the dataset at ``data_dir``.

    Local paths (including a bucket mounted with gcsfuse) are used in place. ``gs://`` datasets
    are copied to ``local_cache_dir`` first (see :func:`copy_dataset`: once, checked for room,
    verified): ArrayRecord reads local files, and random access over the network would make the
    input pipeline the bottleneck. Other schemes are refused.
    """
    if "://" not in data_dir:
        return data_dir
    scheme = data_dir.split("://", 1)[0]
    if scheme not in SUPPORTED_REMOTE_SCHEMES:
        raise DataError(f"config.data.dir={data_dir!r}: the {scheme}:// scheme is not supported; "
                        f"use a local path, a mounted bucket, or gs:// (copied to "
                        f"config.data.local_cache_dir)")
    if not local_cache_dir:
        raise DataError(f"config.data.dir={data_dir!r} is remote: set config.data.local_cache_dir "
                        "to a local directory with room for the shards")
    name = data_dir.rstrip("/").rsplit("/", 1)[-1]
    return os.fspath(copy_dataset(data_dir, epath.Path(local_cache_dir) / name))


def split_evenly(items: Sequence[Any], num_shards: int) -> list[Sequence[Any]]:
    """Deterministic contiguous assignment of items to shards, sizes differing by at most one."""
    base, extra = divmod(len(items), num_shards)
    bounds, start = [], 0
    for index in range(num_shards):
        end = start + base + (index < extra)
        bounds.append(items[start:end])
        start = end
    return bounds
