"""What every converter shares: example order, held-out splits and a resumable parallel writer.

A converter only has to turn its source into ``{split: [Example, ...]}`` plus label names; this
module orders the examples, carves a held-out split off ``train``, assigns examples to shards
(``split_evenly``), writes the shards in worker processes and finishes with ``manifest.json``.

Resuming: next to every finished shard lies ``<shard>.json``, a sidecar with its ShardInfo and a
digest of what the plan put in it (ids, labels, source sizes, re-encoding). A re-run skips a shard
only when its file still matches the sidecar (sha256 and record count) and the sidecar matches the
plan; a missing or damaged shard, a stale ``.tmp`` or a changed plan means it is written again.
The manifest is removed when a conversion starts and written when it ends, so a directory with a
manifest is always complete.

Bad input: symlinks are followed once by real path (a loop is walked once, a linked duplicate is
converted once). Every image is fully decoded while converting, so a truncated file fails here,
not in training. Undecodable and oversized images and non-UTF-8 file names are left out and listed
in ``skipped_files.json`` next to the manifest (``--on-bad-image=error`` fails on the first one
instead, naming it). Images of more than 8 bits per sample are stored as 8-bit PNG (value >> 8),
since the training decoder's ``convert("RGB")`` would clip them at 255; the manifest counts them.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np
import tqdm
from etils import epath
from PIL import Image

from byol_flax.runtime.outputs import check_output_dir, claim_output_dir
from byol_flax.data.imagenet import IMAGENET_HOLDOUT_COUNT, IMAGENET_TRAIN_EXAMPLES
from byol_flax.data.records import (UNLABELED, DataError, Manifest, Record, ShardInfo, SplitInfo,
                                    count_records, file_sha256, manifest_path, shard_name,
                                    split_evenly, write_manifest, write_shard)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
# The documented seed of the example order: changing it changes every shard and held-out split.
DEFAULT_ORDER_SEED = 0
DEFAULT_EXAMPLES_PER_SHARD = 1024
DEFAULT_HOLDOUT_NAME = "holdout"
# Conversion is mostly file I/O and hashing; more than 16 processes rarely helps.
DEFAULT_WORKERS = max(1, min(16, os.cpu_count() or 1))
REENCODE_CHOICES = ("none", "png", "jpeg")
JPEG_QUALITY = 95
SIDECAR_SUFFIX = ".json"
TMP_SUFFIX = ".tmp"
# Split names become file-name prefixes, and "-" separates the prefix from the shard index.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.]+")
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})
# Where a held-out split comes from: the tail of the seeded order, or the tail of the order the
# converter read the split in (TFDS order for tfds_to_arrayrecord: the paper's split).
HOLDOUT_ORDERS = ("seeded", "source")
# The largest image converted (width x height). Training decodes every image once per epoch in
# each input worker: 100 Mpx is 300 MB of RGB per decode, and a few such images in flight exhaust a
# host. Pillow itself refuses 2 x 89.5 Mpx as a decompression bomb (a tiny file claiming a huge
# size); this limit is below that, so both are reported the same way.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
BAD_IMAGE_CHOICES = ("skip", "error")
SKIPPED_FILES_NAME = "skipped_files.json"
# Pillow modes with more than 8 bits per sample ("I" is how Pillow may open a 16-bit PNG). 16-bit
# RGB(A) PNGs are opened as 8-bit RGB(A) by Pillow itself (high byte), so they need nothing.
HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# How many ids of converted 16-bit images the manifest lists (the count is always exact).
_LISTED_IDS = 20


@dataclasses.dataclass(frozen=True)
class Example:
    """One image to write: where its encoded bytes come from (a file or bytes), label and id.

    A file is read in the worker that writes its shard, so planning a million-image tree holds
    only paths in memory.
    """

    id: str
    label: int
    path: str | None = None
    data: bytes | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError(f"example {self.id!r}: give exactly one of path and data")

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return pathlib.Path(self.path).read_bytes()
        except OSError as error:
            raise BadImage(self.origin, f"cannot be read ({error})") from error

    @property
    def origin(self) -> str:
        """How errors and the skipped-files list name this example (bytes of odd names escaped)."""
        return printable_path(self.path) if self.path is not None else f"example {self.id!r}"

    def source_fingerprint(self) -> str:
        """Cheap identity of the source bytes for the resume check (size, not a full read)."""
        if self.data is not None:
            return "sha256:" + hashlib.sha256(self.data).hexdigest()
        try:
            return f"size:{os.path.getsize(self.path)}"
        except OSError as error:
            raise DataError(f"cannot read image {self.path}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Images


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def printable_path(path: os.PathLike | str) -> str:
    """``path`` with non-UTF-8 bytes written as ``\\xff``: safe in JSON and on a console."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")  # a non-UTF-8 byte was decoded as a lone surrogate by os.walk
    except UnicodeEncodeError:
        return False
    return True


class BadImage(DataError):
    """A file that cannot become a record: unreadable, undecodable, oversized or unnamable."""

    def __init__(self, origin: str, reason: str):
        self.origin, self.reason = origin, " ".join(reason.split())  # one line
        super().__init__(f"bad image {origin}: {self.reason} (--on-bad-image=skip leaves such "
                         "files out and lists them)")

    def __reduce__(self):  # raised in a worker process, re-raised in the parent
        return BadImage, (self.origin, self.reason)


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file left out of the conversion and why (``file`` is printable: see printable_path)."""

    file: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """What a conversion does with bad images (skip them or fail) and the size limit."""

    on_bad: str = "skip"
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.on_bad not in BAD_IMAGE_CHOICES:
            raise DataError(f"on-bad-image {self.on_bad!r} is not one of {BAD_IMAGE_CHOICES}")
        if self.max_pixels < 1:
            raise DataError(f"max image pixels {self.max_pixels} must be positive")


class ImageScan:
    """Finds image files under roots, each real file once, and records what it leaves out.

    Symlinks are followed because large trees are often assembled from links, but by real path:
    a directory already walked is not walked again (a link to a parent would loop forever) and a
    file already found is not converted twice (it would be a duplicate, across splits a leak).
    One scan is shared by every split of a conversion.
    """

    def __init__(self, policy: ImagePolicy = ImagePolicy()):
        self.policy = policy
        self.skipped: list[SkippedFile] = []
        self._dirs: set[str] = set()  # real paths of directories walked or to be walked
        self._pending: set[str] = set()  # reserved for a later find()
        self._files: set[str] = set()

    def claim(self, *directories: pathlib.Path, walk_later: bool = False) -> None:
        """Marks directories as part of the conversion, so links to them are not followed.

        A tree's root and its class folders are claimed before any is walked: a link from one
        class folder to another (or to the root) must not pull those images into its class.
        """
        for directory in directories:
            real = os.path.realpath(directory)
            if walk_later and real not in self._dirs:
                self._pending.add(real)
            self._dirs.add(real)

    def _leave_out(self, path: str, reason: str, *, bad: bool = False) -> None:
        if bad and self.policy.on_bad == "error":
            raise BadImage(printable_path(path), reason)
        self.skipped.append(SkippedFile(printable_path(path), reason))

    def _new_dir(self, path: str, *, root: bool = False) -> bool:
        real = os.path.realpath(path)
        if root and real in self._pending:
            self._pending.remove(real)
        elif real in self._dirs:
            self._leave_out(path, f"a link to directory {printable_path(real)}, which is "
                                  "already part of the conversion")
            return False
        self._dirs.add(real)
        return True

    def find(self, root: pathlib.Path, *, recursive: bool = True) -> list[pathlib.Path]:
        """Sorted image files under ``root`` (skipping dot-files), new to this scan."""
        if not self._new_dir(os.fspath(root), root=True):
            return []
        candidates = []
        for directory, subdirs, files in os.walk(root, followlinks=True):
            subdirs[:] = [name for name in sorted(subdirs) if recursive
                          and not name.startswith(".") and self._new_dir(os.path.join(directory,
                                                                                      name))]
            candidates.extend(pathlib.Path(directory, name) for name in files
                              if is_image_file(name))
        found = []
        for path in sorted(candidates):
            text = os.fspath(path)
            real = os.path.realpath(text)
            if not is_utf8(text):
                self._leave_out(text, "file name is not valid UTF-8 (it cannot be a record id)",
                                bad=True)
            elif not os.path.isfile(real):
                self._leave_out(text, f"a link to {printable_path(real)}, which is not a file",
                                bad=True)
            elif real in self._files:
                self._leave_out(text, f"same file as one found already ({printable_path(real)})")
            else:
                self._files.add(real)
                found.append(path)
        return found

    def left_out_under(self, root: pathlib.Path) -> list[SkippedFile]:
        prefix = printable_path(root).rstrip("/") + "/"
        return [s for s in self.skipped if s.file.startswith(prefix)]


def decode_fully(data: bytes, origin: str,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The fully decoded PIL image, or :class:`BadImage` saying why not.

    A header check would let a truncated file through to fail in the middle of training: every
    pixel is decoded here, once.
    """
    with warnings.catch_warnings():  # the size is checked below, against our own limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise BadImage(origin, f"oversized: {error}") from error
        except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ...)
            raise BadImage(origin, f"not a readable image ({type(error).__name__}: {error})"
                           ) from error
        if (pixels := image.width * image.height) > max_pixels:
            raise BadImage(origin, f"oversized: {image.width}x{image.height} = {pixels} pixels, "
                                   f"over the limit of {max_pixels} (--max-image-pixels)")
        try:
            image.load()
        except MemoryError:
            raise
        except Image.DecompressionBombError as error:
            raise BadImage(origin, f"oversized: {error}") from error
        except Exception as error:
            raise BadImage(origin, f"cannot be fully decoded ({type(error).__name__}: {error})"
                           ) from error
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """Samples of more than 8 bits as 8 bits (value >> 8); other images unchanged.

    Pillow's ``convert("L" / "RGB")``, which training's decoder applies, clips them at 255
    instead: a 16-bit image would come out nearly white.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8))


def encode_image(image: Image.Image | np.ndarray, fmt: str) -> bytes:
    """Encodes a PIL image (or an HxW / HxWxC array) as 8-bit PNG or JPEG bytes."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image = to_8bit(image)
    allowed = _PNG_MODES if fmt == "png" else {"L", "RGB"}
    if image.mode not in allowed:
        image = image.convert("RGBA" if fmt == "png" and "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "jpeg" else {}
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def load_image_bytes(example: Example, reencode: str,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[bytes, bool]:
    """(bytes to store, whether a >8-bit image was scaled to 8 bits), after a full decode.

    Bytes are stored as found unless re-encoding is asked for, or the image has more than 8 bits
    per sample: then it is stored as 8-bit PNG (or the asked-for format).
    """
    data = example.read()
    image = decode_fully(data, example.origin, max_pixels)
    high = image.mode in HIGH_BIT_DEPTH_MODES
    if reencode == "none" and not high:
        return data, False
    fmt = "png" if reencode == "none" else reencode
    try:
        return encode_image(image, fmt), high
    except OSError as error:
        raise DataError(f"{example.origin} could not be re-encoded as {fmt}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Order and held-out splits


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


# ---------------------------------------------------------------------------------------------
# Shard writing


@dataclasses.dataclass(frozen=True)
class Sharding:
    """Either a shard count per split or a target number of examples per shard."""

    num_shards: int | None = None
    examples_per_shard: int | None = DEFAULT_EXAMPLES_PER_SHARD

    def shards_for(self, num_examples: int) -> int:
        """Shards for a split; capped at its size because an empty shard is useless."""
        if self.num_shards is not None:
            wanted = self.num_shards
        else:
            wanted = math.ceil(num_examples / self.examples_per_shard)
        return max(1, min(wanted, num_examples))

    def describe(self) -> dict[str, int]:
        if self.num_shards is not None:
            return {"num_shards": self.num_shards}
        return {"examples_per_shard": self.examples_per_shard}


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    split: str
    index: int
    path: str
    examples: tuple[Example, ...]
    reencode: str
    policy: ImagePolicy = ImagePolicy()


@dataclasses.dataclass(frozen=True)
class _ShardOutcome:
    split: str
    index: int
    info: ShardInfo
    skipped: bool
    reason: str  # why it was (re)written; "" when skipped
    left_out: tuple[SkippedFile, ...] = ()  # bad images not written
    converted: tuple[str, ...] = ()  # ids of >8-bit images stored as 8 bits


def _plan_digest(examples: Sequence[Example], reencode: str, max_pixels: int) -> str:
    digest = hashlib.sha256(f"reencode={reencode}\nmax_pixels={max_pixels}\n".encode())
    for example in examples:
        line = json.dumps([example.id, example.label, example.source_fingerprint()])
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def sidecar_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_name(shard.name + SIDECAR_SUFFIX)


def tmp_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_name(shard.name + TMP_SUFFIX)


def _why_rewrite(task: _ShardTask, digest: str) -> tuple[str, _ShardOutcome | None]:
    """("", outcome) when the shard on disk is the planned one, else (reason, None)."""
    shard = pathlib.Path(task.path)
    if tmp_path(shard).exists():
        return "a stale .tmp file shows an interrupted write", None
    if not shard.exists():
        return "missing", None
    sidecar = sidecar_path(shard)
    if not sidecar.exists():
        return "no sidecar", None
    try:
        meta = json.loads(sidecar.read_text())
        info = ShardInfo(file=meta["file"], num_records=int(meta["num_records"]),
                         sha256=meta["sha256"])
        planned = meta["plan_sha256"]
        left_out = tuple(SkippedFile(**item) for item in meta["left_out"])
        converted = tuple(str(i) for i in meta["converted_to_8bit"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable sidecar", None
    if info.file != shard.name or info.num_records + len(left_out) != len(task.examples):
        return "sidecar does not match the planned record count", None
    if planned != digest:
        return "the planned contents changed", None
    if left_out and task.policy.on_bad == "error":
        return "an earlier run left bad images out", None
    if file_sha256(shard) != info.sha256:
        return "sha256 does not match its sidecar", None
    try:
        if count_records(shard) != info.num_records:
            return "record count does not match its sidecar", None
    except DataError:
        return "unreadable shard", None
    return "", _ShardOutcome(task.split, task.index, info, skipped=True, reason="",
                             left_out=left_out, converted=converted)


def _write_json_atomically(path: pathlib.Path, payload: dict[str, Any]) -> None:
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def _shard_records(task: _ShardTask, left_out: list[SkippedFile],
                   converted: list[str]) -> Iterator[Record]:
    """The task's records, leaving bad images out (into ``left_out``) or raising on them."""
    for example in task.examples:
        try:
            image, scaled = load_image_bytes(example, task.reencode, task.policy.max_pixels)
        except BadImage as bad:
            if task.policy.on_bad == "error":
                raise
            left_out.append(SkippedFile(bad.origin, bad.reason))
            continue
        if scaled:
            converted.append(example.id)
        yield Record(image=image, label=example.label, id=example.id)


def _run_shard_task(task: _ShardTask) -> _ShardOutcome:
    """Skips the shard if it is already done, else writes it and then its sidecar (a worker)."""
    shard = pathlib.Path(task.path)
    digest = _plan_digest(task.examples, task.reencode, task.policy.max_pixels)
    reason, done = _why_rewrite(task, digest)
    if done is not None:
        return done
    # Sidecar first: a crash from here on must never leave an old sidecar next to a new file.
    # The old shard goes too: write_shard's rename (epath) refuses to replace a file.
    for stale in (sidecar_path(shard), tmp_path(shard), shard):
        stale.unlink(missing_ok=True)
    left_out: list[SkippedFile] = []
    converted: list[str] = []
    try:
        info = write_shard(epath.Path(shard), _shard_records(task, left_out, converted))
    except BaseException:
        tmp_path(shard).unlink(missing_ok=True)  # no half-written shard is left behind
        raise
    _write_json_atomically(sidecar_path(shard), {
        **dataclasses.asdict(info), "plan_sha256": digest,
        "left_out": [dataclasses.asdict(item) for item in left_out],
        "converted_to_8bit": converted})
    return _ShardOutcome(task.split, task.index, info, skipped=False, reason=reason,
                         left_out=tuple(left_out), converted=tuple(converted))


def _run_tasks(tasks: Sequence[_ShardTask], workers: int) -> Iterator[_ShardOutcome]:
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _run_shard_task(task)
        return
    # "spawn": the caller may have started JAX/TF threads, which fork() does not survive.
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        pending = [pool.submit(_run_shard_task, task) for task in tasks]
        try:
            for done in futures.as_completed(pending):
                yield done.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _stale_files(out_dir: pathlib.Path, split: str, planned: set[str]) -> list[pathlib.Path]:
    """Shards of ``split`` (and their sidecars/.tmp) from an earlier plan with another count."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.array_record")
    stale = []
    for path in out_dir.iterdir():
        base = path.name.removesuffix(TMP_SUFFIX).removesuffix(SIDECAR_SUFFIX)
        if pattern.fullmatch(base) and base not in planned:
            stale.append(path)
    return sorted(stale)


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What a conversion did, for the summary line and for tests."""

    out_dir: pathlib.Path
    manifest: Manifest
    written: tuple[str, ...]
    skipped: tuple[str, ...]
    removed: tuple[str, ...]
    left_out: tuple[SkippedFile, ...] = ()  # files not converted (bad, duplicate), with reasons
    converted: tuple[str, ...] = ()  # ids of >8-bit images stored as 8 bits

    def summary(self) -> str:
        counts = " ".join(f"{name}={split.num_records}"
                          for name, split in self.manifest.splits.items())
        removed = f", {len(self.removed)} stale files removed" if self.removed else ""
        left_out = (f"; {len(self.left_out)} files left out (bad images, duplicates), listed in "
                    f"{self.out_dir / SKIPPED_FILES_NAME}" if self.left_out else "")
        converted = (f"; {len(self.converted)} images of more than 8 bits per sample stored as "
                     "8-bit (value >> 8)" if self.converted else "")
        return (f"{self.manifest.dataset}: {counts} records; {len(self.written)} shards written, "
                f"{len(self.skipped)} skipped{removed}{left_out}{converted} -> {self.out_dir}")


def _validate(splits: Mapping[str, Sequence[Example]], label_names: Sequence[str]) -> None:
    if not splits:
        raise DataError("nothing to convert: no splits")
    for split, examples in splits.items():
        if not _SPLIT_NAME.fullmatch(split):
            raise DataError(f"split name {split!r} may only hold letters, digits, '_' and '.'")
        if not examples:
            raise DataError(f"split {split!r} has no examples")
        seen = set()
        for example in examples:
            if example.id in seen:
                raise DataError(f"split {split!r}: id {example.id!r} occurs more than once")
            seen.add(example.id)
            valid = (example.label == UNLABELED if not label_names
                     else 0 <= example.label < len(label_names))
            if not valid:
                raise DataError(f"split {split!r}: example {example.id!r} has label "
                                f"{example.label}, outside the {len(label_names)} label names")


def convert(out_dir: os.PathLike | str, splits: Mapping[str, Sequence[Example]], *,
            dataset: str, label_names: Sequence[str], source: Mapping[str, Any],
            sharding: Sharding = Sharding(), workers: int = 1, reencode: str = "none",
            progress: bool = True, policy: ImagePolicy = ImagePolicy(),
            left_out: Sequence[SkippedFile] = ()) -> ConversionResult:
    """Writes ``splits`` (already in their final order) as shards plus ``manifest.json``.

    Shard assignment is ``split_evenly`` over the given order, so the same input gives
    byte-identical shards (a bad image is left out of its shard, the others keep theirs).
    ``label_names`` empty means unlabeled (every label UNLABELED). ``left_out``: files the
    caller's scan left out, listed with the bad images in ``skipped_files.json``.
    """
    if reencode not in REENCODE_CHOICES:
        raise DataError(f"reencode {reencode!r} is not one of {REENCODE_CHOICES}")
    _validate(splits, label_names)
    # A new or empty directory, or an earlier (perhaps killed) conversion: never a user's files.
    out_dir = pathlib.Path(claim_output_dir(out_dir, "dataset"))
    manifest_path(out_dir).unlink(missing_ok=True)

    tasks, removed = [], []
    for split, examples in splits.items():
        count = sharding.shards_for(len(examples))
        names = [shard_name(split, index, count) for index in range(count)]
        for path in _stale_files(out_dir, split, set(names)):
            path.unlink()
            removed.append(path.name)
        for index, (name, part) in enumerate(zip(names, split_evenly(list(examples), count))):
            tasks.append(_ShardTask(split, index, str(out_dir / name), tuple(part), reencode,
                                    policy))

    infos: dict[str, list[ShardInfo | None]] = {
        split: [None] * sum(t.split == split for t in tasks) for split in splits}
    written, skipped, all_left_out, converted = [], [], list(left_out), []
    total = sum(len(examples) for examples in splits.values())
    with tqdm.tqdm(total=total, unit="img", desc=dataset, disable=not progress,
                   dynamic_ncols=True) as bar:
        for outcome in _run_tasks(tasks, workers):
            infos[outcome.split][outcome.index] = outcome.info
            (skipped if outcome.skipped else written).append(outcome.info.file)
            all_left_out.extend(outcome.left_out)
            converted.extend(outcome.converted)
            if outcome.reason and outcome.reason != "missing":
                bar.write(f"rewrote {outcome.info.file}: {outcome.reason}", file=sys.stderr)
            bar.update(outcome.info.num_records + len(outcome.left_out))

    all_left_out.sort(key=lambda item: item.file)
    _write_skipped_files(out_dir, all_left_out)
    split_infos = {split: SplitInfo(num_records=sum(i.num_records for i in infos[split]),
                                    shards=tuple(infos[split])) for split in splits}
    if empty := [split for split, info in split_infos.items() if not info.num_records]:
        raise DataError(f"split {empty[0]!r}: every image was left out as bad; see "
                        f"{out_dir / SKIPPED_FILES_NAME}")
    extra: dict[str, Any] = {"max_image_pixels": policy.max_pixels,
                             "left_out_files": len(all_left_out)}
    if converted:
        converted.sort()
        extra["converted_to_8bit"] = {
            "count": len(converted), "ids": converted[:_LISTED_IDS],
            "how": "more than 8 bits per sample: value >> 8, stored as 8-bit "
                   + ("PNG" if reencode == "none" else reencode.upper())}
    manifest = Manifest(
        dataset=dataset, label_names=tuple(label_names), splits=split_infos,
        source={**source, "reencode": reencode, "sharding": sharding.describe(), **extra})
    write_manifest(out_dir, manifest)
    return ConversionResult(out_dir, manifest, tuple(sorted(written)), tuple(sorted(skipped)),
                            tuple(removed), tuple(all_left_out), tuple(converted))


def _write_skipped_files(out_dir: pathlib.Path, left_out: Sequence[SkippedFile]) -> None:
    """``skipped_files.json`` lists what was left out; none is left when nothing was."""
    path = out_dir / SKIPPED_FILES_NAME
    if not left_out:
        path.unlink(missing_ok=True)
        return
    _write_json_atomically(path, {"count": len(left_out),
                                  "files": [dataclasses.asdict(item) for item in left_out]})


def read_skipped_files(out_dir: os.PathLike | str) -> list[SkippedFile]:
    """The files a conversion into ``out_dir`` left out (none when there is no list)."""
    path = pathlib.Path(out_dir) / SKIPPED_FILES_NAME
    if not path.exists():
        return []
    try:
        return [SkippedFile(**item) for item in json.loads(path.read_text())["files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a skipped-files list: {error!r}") from error


# ---------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1")
    return value


def make_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """A converter's parser: a usage error is one line (console.ArgumentParser), status 2."""
    from byol_flax.runtime import console  # noqa: PLC0415

    return console.ArgumentParser(prog=f"python -m {prog}", description=description,
                                  epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_arguments(parser: argparse.ArgumentParser, *,
                         examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD) -> None:
    """--out, the shard size (--num-shards | --examples-per-shard), --workers, --no-progress."""
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="output directory: shards, their .json sidecars and manifest.json; "
                             "re-running into it resumes (finished shards are skipped)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-shards", type=positive_int,
                       help="shards per split (capped at the split's size)")
    group.add_argument("--examples-per-shard", type=positive_int, default=examples_per_shard,
                       help="target examples per shard, the shard count being rounded up "
                            "(default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS,
                        help="worker processes, one shard per task (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_holdout_arguments(parser: argparse.ArgumentParser, order: str = "the seeded order"
                          ) -> None:
    """--holdout-count | --holdout-fraction and --holdout-name: a split carved off train."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--holdout-count", type=positive_int,
                       help=f"hold out the last N examples of train (in {order}) as a "
                            "separate split, kept out of train")
    group.add_argument("--holdout-fraction", type=fraction,
                       help="like --holdout-count, with N = round(F * len(train))")
    parser.add_argument("--holdout-name", default=DEFAULT_HOLDOUT_NAME,
                        help="name of the held-out split (default %(default)s)")


def add_order_seed_argument(parser: argparse.ArgumentParser, flag: str = "--order-seed") -> None:
    parser.add_argument(flag, type=int, default=DEFAULT_ORDER_SEED,
                        help="seed of the example order: ids sorted, then permuted by "
                             "sha256('<seed>:<id>'); fixes shard contents and held-out splits "
                             "(default %(default)s)")


def add_reencode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reencode", choices=REENCODE_CHOICES, default="none",
                        help="store images as found (none, the default) or re-encode them as "
                             f"png or jpeg (quality {JPEG_QUALITY})")


def imagenet_holdout(args: argparse.Namespace, num_train: int,
                     where: str) -> tuple[int | None, float | None]:
    """(count, fraction) to hold out: IMAGENET_HOLDOUT_COUNT with --imagenet-holdout.

    --holdout-count overrides the number (a small test tree); a train split that is not
    ImageNet's size gets a note, since the count is then not the paper's share.
    """
    if not args.imagenet_holdout:
        return args.holdout_count, args.holdout_fraction
    if args.holdout_fraction is not None:
        raise DataError("--imagenet-holdout holds out a count: it excludes --holdout-fraction")
    if args.holdout_count is not None:
        return args.holdout_count, None
    if num_train != IMAGENET_TRAIN_EXAMPLES:
        print(f"note: {where} has {num_train} images, not the {IMAGENET_TRAIN_EXAMPLES} of "
              f"ImageNet: holdout gets {IMAGENET_HOLDOUT_COUNT}, train the rest", file=sys.stderr)
    return IMAGENET_HOLDOUT_COUNT, None


def add_bad_image_arguments(parser: argparse.ArgumentParser) -> None:
    """--on-bad-image and --max-image-pixels."""
    parser.add_argument("--on-bad-image", choices=BAD_IMAGE_CHOICES, default="skip",
                        help="an unreadable, truncated or oversized image, or a file name that "
                             "is not UTF-8: leave it out and list it in "
                             f"OUT/{SKIPPED_FILES_NAME} (skip, the default) or stop with an "
                             "error naming it (error)")
    parser.add_argument("--max-image-pixels", type=positive_int,
                        default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="larger images (width x height) are bad: every training input "
                             "worker would decode them each epoch (default %(default)s)")


def policy_from_args(args: argparse.Namespace) -> ImagePolicy:
    return ImagePolicy(on_bad=args.on_bad_image, max_pixels=args.max_image_pixels)


def sharding_from_args(args: argparse.Namespace) -> Sharding:
    if args.num_shards is not None:
        return Sharding(num_shards=args.num_shards, examples_per_shard=None)
    return Sharding(examples_per_shard=args.examples_per_shard)


def provenance(converter: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The manifest's ``source``: converter and every content-affecting option, JSON-safe."""
    ignored = {"out", "workers", "no_progress"}
    options = {key: (str(value) if isinstance(value, os.PathLike) else value)
               for key, value in sorted(vars(args).items()) if key not in ignored}
    return {"converter": converter, "options": options, **extra}


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


def check_out(args: argparse.Namespace, *inputs: os.PathLike | str) -> None:
    """Refuses ``--out`` before any image is read unless it is new, empty or an earlier
    conversion, and outside ``inputs`` (:func:`byol_flax.runtime.outputs.check_output_dir`)."""
    check_output_dir(args.out, "dataset", inputs=[os.fspath(i) for i in inputs])


def convert_from_args(args: argparse.Namespace, splits: Mapping[str, Sequence[Example]], *,
                      dataset: str, label_names: Sequence[str], source: Mapping[str, Any],
                      seed: int, holdout_count: int | None = None,
                      holdout_fraction: float | None = None, holdout_order: str = "seeded",
                      reencode: str = "none", policy: ImagePolicy = ImagePolicy(),
                      left_out: Sequence[SkippedFile] = ()) -> ConversionResult:
    """The tail of every converter's main: order, hold out, write, print the summary line."""
    holdout_name = getattr(args, "holdout_name", DEFAULT_HOLDOUT_NAME)
    ordered = order_and_hold_out(splits, seed=seed, holdout_count=holdout_count,
                                 holdout_fraction=holdout_fraction, holdout_name=holdout_name,
                                 holdout_order=holdout_order)
    source = dict(source)
    if holdout_count is not None or holdout_fraction is not None:
        source["holdout"] = {"split": holdout_name, "carved_from": "train",
                             "count": holdout_count, "fraction": holdout_fraction,
                             "tail_of": holdout_order}
    result = convert(args.out, ordered, dataset=dataset, label_names=label_names, source=source,
                     sharding=sharding_from_args(args), workers=args.workers, reencode=reencode,
                     progress=not args.no_progress, policy=policy, left_out=left_out)
    print(result.summary())
    return result


def run_cli(body: Callable[[], object], command: str = "byol_flax.data.convert") -> int:
    """Runs a converter body: 0 on success, 1 with a one-line ``error:`` on bad input (a
    ``DataError`` by its message, another UserError or an ``OSError`` with its type), the
    traceback in the log file (``console.report_error``)."""
    from byol_flax.runtime import console  # noqa: PLC0415

    def body_or_data_error() -> int:
        try:
            body()
        except DataError as error:
            console.report_error(f"error: {error}", error, command=command)
            return 1
        return 0

    return console.run_cli(body_or_data_error, command)
