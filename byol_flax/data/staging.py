"""A ``gs://`` dataset staged on local disk before training reads it.

ArrayRecord reads local files, and random access over the network would make the input pipeline
the bottleneck: :func:`resolve_data_dir` copies a ``gs://`` dataset to
``config.data.local_cache_dir`` once per host. The copy itself (free-space check, sha256 per
shard, stamp, resume, one process at a time) is :mod:`byol_flax.storage.staging`; this module
says what a dataset's copy is (its manifest and the shards it names) and checks the record
counts before the copy is stamped.
"""

import os

from etils import epath

from byol_flax.data.records import (
    MANIFEST_NAME,
    DataError,
    Manifest,
    manifest_path,
    verify_split,
)
from byol_flax.storage import files
from byol_flax.storage import staging as file_staging

SUPPORTED_REMOTE_SCHEMES = ("gs",)
_WORDING = file_staging.Wording(copy="dataset", file="shard", index="manifest",
                                setting="config.data.local_cache_dir")


def is_verified_copy(local_dir: epath.PathLike) -> bool:
    """Whether ``local_dir`` is a copy whose shards were sha256-verified when it was made.

    True when its stamp names the sha256 of the manifest beside it: the input pipeline may then
    skip hashing the shards again (counts and sizes are cheap and still worth checking).
    """
    return file_staging.verified_sha256(local_dir, MANIFEST_NAME) is not None


def copy_dataset(source: epath.PathLike, destination: epath.PathLike,
                 workers: int = 8) -> epath.Path:
    """Copies ``manifest.json`` and every shard it names to the local ``destination``, verified.

    A destination stamped as a verified copy of the source's current manifest is used as it is:
    a restart copies and hashes nothing. Otherwise the shards go to ``<destination>.partial``
    after a free-space check, each is sha256-checked against the manifest, the record counts are
    checked, the directory is stamped and renamed to ``destination``
    (:func:`byol_flax.storage.staging.copy_verified`). Failures are :class:`DataError`.
    """
    source = epath.Path(source)
    try:
        manifest_bytes = files.read_bytes(manifest_path(source), what="manifest")
    except OSError as error:
        raise DataError(f"{manifest_path(source)} cannot be read: {error}") from error
    manifest = Manifest.from_json(manifest_bytes.decode("utf-8", "replace"),
                                  origin=str(manifest_path(source)))

    def counts_add_up(partial: str) -> None:
        for split in manifest.splits:
            verify_split(partial, manifest, split, checksum=False)  # hashed while copying

    wanted = {shard.file: shard.sha256
              for split in manifest.splits.values() for shard in split.shards}
    try:
        return file_staging.copy_verified(
            source, destination, index_name=MANIFEST_NAME, index_bytes=manifest_bytes,
            wanted=wanted, check=counts_add_up, wording=_WORDING, workers=workers)
    except file_staging.StagingError as error:
        raise DataError(str(error)) from None


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
