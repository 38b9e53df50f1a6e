"""The one deterministic example order of every conversion, and held-out splits carved off it.

Shard contents and held-out splits follow from the order seed and the example ids alone, so the
same source converts to the same shards on any machine. :class:`Spool` puts a streamed split in
that same order on disk, in bounded memory.
"""

import contextlib
import hashlib
import itertools
import json
import math
import os
import pathlib
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from byol_flax.data.convert.image_io import Example
from byol_flax.data.records import DataError, split_evenly
from byol_flax.storage import json_files

# The documented seed of the example order: changing it changes every shard and held-out split.
DEFAULT_ORDER_SEED = 0
DEFAULT_HOLDOUT_NAME = "holdout"
# Where a held-out split comes from: the tail of the seeded order, or the tail of the order the
# converter read the split in (TFDS order for tfds_to_arrayrecord: the paper's split).
HOLDOUT_ORDERS = ("seeded", "source")


def _order_key(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).digest()


def seeded_order(examples: Iterable[Example], seed: int = DEFAULT_ORDER_SEED) -> list[Example]:
    """The deterministic order of a split: sorted by id, then permuted by ``sha256(seed:id)``.

    A keyed hash rather than an RNG permutation: the order depends only on the seed and the ids,
    not on numpy's generator or the platform, and it mixes classes, so a held-out tail is spread
    across them.
    """
    return sorted(sorted(examples, key=lambda e: e.id), key=lambda e: _order_key(seed, e.id))


def holdout_size(num_examples: int, *, count: int | None = None,
                 fraction: float | None = None) -> int:
    """Number of examples to hold out (0 when neither is given); errors name the bad value."""
    if count is not None and fraction is not None:
        raise DataError("give a held-out count or a fraction, not both")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise DataError(f"held-out fraction {fraction} must lie strictly between 0 and 1")
        count = max(1, math.floor(fraction * num_examples + 0.5))
    if count is None:
        return 0
    if not 0 < count < num_examples:
        raise DataError(f"held-out count {count} must be between 1 and {num_examples - 1}: "
                        f"the split it is carved from has {num_examples} examples")
    return count


def carve_holdout(examples: Sequence[Example], *, count: int | None = None,
                  fraction: float | None = None) -> tuple[list[Example], list[Example]]:
    """Splits an ordered split into (kept, held out): the held-out part is its tail."""
    size = holdout_size(len(examples), count=count, fraction=fraction)
    cut = len(examples) - size
    return list(examples[:cut]), list(examples[cut:])


def order_and_hold_out(splits: Mapping[str, Sequence[Example]], *, seed: int,
                       holdout_count: int | None = None, holdout_fraction: float | None = None,
                       holdout_name: str = DEFAULT_HOLDOUT_NAME,
                       holdout_from: str = "train",
                       holdout_order: str = "seeded") -> dict[str, list[Example]]:
    """Every split in the seeded order, with the tail of ``holdout_from`` moved out.

    The tail of the seeded order (a seeded random choice), or with ``holdout_order="source"``
    the tail of ``splits[holdout_from]`` as given: the paper's ImageNet split is the last
    IMAGENET_HOLDOUT_COUNT images in TFDS order (Appendix E.1). Both parts are then put in the
    seeded order.
    """
    if holdout_order not in HOLDOUT_ORDERS:
        raise DataError(f"holdout order {holdout_order!r} is not one of {HOLDOUT_ORDERS}")
    splits = dict(splits)
    if holdout_count is not None or holdout_fraction is not None:
        if holdout_from not in splits:
            raise DataError(f"cannot hold out examples of {holdout_from!r}: the splits are "
                            f"{sorted(splits)}")
        if holdout_name in splits:
            raise DataError(f"held-out split name {holdout_name!r} is already a split")
        source = splits[holdout_from]
        if holdout_order == "seeded":
            source = seeded_order(source, seed)
        splits[holdout_from], splits[holdout_name] = carve_holdout(
            source, count=holdout_count, fraction=holdout_fraction)
    return {name: seeded_order(examples, seed) for name, examples in splits.items()}


# The seeded order of a streamed split, sorted on disk: every shard holds examples from all over
# the source (the order is a keyed hash of the ids), so no shard is complete before the last
# example is read. Examples go to bucket files by the leading bytes of their order key (buckets
# are thus ranges of the order); each bucket is then sorted alone, from its entries' headers.
SPOOL_BUCKET_EXAMPLES = 4096
MAX_SPOOL_BUCKETS = 512  # open files while the source is read, one per bucket
_ENTRY = struct.Struct(">32sIQ")  # order key, length of the JSON [id, label], of the image
_SPOOL_DONE = "complete.json"


class Spool:
    """Splits spooled to ``directory`` in buckets of their seeded order: an external sort.

    Memory holds one open file per bucket and, when reading back, one bucket's headers; the
    disk holds a copy of the encoded images until :meth:`remove`. ``complete.json`` marks a
    finished spool with the ``identity`` of what was read, so a re-run reuses it.
    """

    def __init__(self, directory: os.PathLike | str, *, seed: int, sizes: Mapping[str, int]):
        self.directory = pathlib.Path(directory)
        self.seed = seed
        self.sizes = dict(sizes)
        self.buckets = {split: max(1, min(MAX_SPOOL_BUCKETS,
                                          math.ceil(size / SPOOL_BUCKET_EXAMPLES)))
                        for split, size in self.sizes.items()}

    def _path(self, split: str, bucket: int) -> pathlib.Path:
        return self.directory / f"{split}-{bucket:05d}.spool"

    def _paths(self) -> list[pathlib.Path]:
        return [self._path(split, b) for split, count in self.buckets.items()
                for b in range(count)]

    def _bucket(self, split: str, key: bytes) -> int:
        return int.from_bytes(key[:8], "big") * self.buckets[split] >> 64

    def reusable(self, identity: Mapping[str, Any]) -> bool:
        """Whether a finished spool of the same ``identity`` (and file sizes) is on disk."""
        try:
            done = json_files.read(self.directory / _SPOOL_DONE, what="spool record")
            sizes = [path.stat().st_size for path in self._paths()]
        except OSError:
            return False
        return done == {"identity": dict(identity), "file_sizes": sizes}

    def write(self, examples: Iterable[tuple[str, Example]], identity: Mapping[str, Any]) -> None:
        """Spools ``(split, example)`` pairs as they come; raises if a split's count differs
        from ``sizes`` (the source's metadata) or an id occurs twice."""
        self.remove()
        self.directory.mkdir(parents=True)
        counts = dict.fromkeys(self.sizes, 0)
        with contextlib.ExitStack() as stack:
            outs = {split: [stack.enter_context(open(self._path(split, b), "wb"))
                            for b in range(count)] for split, count in self.buckets.items()}
            for split, example in examples:
                key = _order_key(self.seed, example.id)
                meta = json.dumps([example.id, example.label]).encode()
                data = example.read()
                out = outs[split][self._bucket(split, key)]
                out.write(_ENTRY.pack(key, len(meta), len(data)) + meta)
                out.write(data)
                counts[split] += 1
        if wrong := {split: n for split, n in counts.items() if n != self.sizes[split]}:
            split = next(iter(wrong))
            raise DataError(f"split {split!r}: read {wrong[split]} examples, but the source's "
                            f"metadata says {self.sizes[split]}")
        for split, count in self.buckets.items():
            for bucket in range(count):
                self._sorted_headers(split, bucket)  # raises on a repeated id
        done = {"identity": dict(identity),
                "file_sizes": [path.stat().st_size for path in self._paths()]}
        json_files.write(self.directory / _SPOOL_DONE, done, what="spool record")

    def _sorted_headers(self, split: str, bucket: int) -> list[tuple[bytes, int]]:
        """(order key, offset) of every entry of a bucket, in the seeded order."""
        headers = []
        with open(self._path(split, bucket), "rb") as file:
            while header := file.read(_ENTRY.size):
                key, meta_size, data_size = _ENTRY.unpack(header)
                headers.append((key, file.tell() - _ENTRY.size))
                file.seek(meta_size + data_size, os.SEEK_CUR)
        headers.sort()
        for (key, offset), (next_key, _) in zip(headers, headers[1:]):
            if key == next_key:
                example_id = self._read(split, bucket, offset).id
                raise DataError(f"split {split!r}: id {example_id!r} occurs more than once")
        return headers

    def _read(self, split: str, bucket: int, offset: int) -> Example:
        with open(self._path(split, bucket), "rb") as file:
            return _read_entry(file, offset)

    def examples(self, split: str) -> Iterator[Example]:
        """The split in its seeded order, read back one example at a time."""
        for bucket in range(self.buckets[split]):
            headers = self._sorted_headers(split, bucket)
            with open(self._path(split, bucket), "rb") as file:
                for _, offset in headers:
                    yield _read_entry(file, offset)

    def shards(self, split: str, num_shards: int) -> Iterator[list[Example]]:
        """The split's shards as ``split_evenly`` cuts its seeded order, one at a time."""
        examples = self.examples(split)
        for part in split_evenly(range(self.sizes[split]), num_shards):
            yield list(itertools.islice(examples, len(part)))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _read_entry(file: Any, offset: int) -> Example:
    file.seek(offset)
    _, meta_size, data_size = _ENTRY.unpack(file.read(_ENTRY.size))
    example_id, label = json.loads(file.read(meta_size))
    return Example(id=example_id, label=label, data=file.read(data_size))
