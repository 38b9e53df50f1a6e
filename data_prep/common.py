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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import tqdm
from etils import epath

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
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


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
            raise DataError(f"cannot read image {self.path}: {error}") from error

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


def find_images(root: pathlib.Path) -> list[pathlib.Path]:
    """Sorted image files under ``root``, recursively (following symlinks, skipping dot-files).

    Symlinks are followed because large trees are often assembled from links.
    """
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(pathlib.Path(directory, name) for name in files if is_image_file(name))
    return sorted(found)


def _pil_image(data: bytes, origin: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{origin} is not a readable image: {error}") from error


def encode_image(image, fmt: str) -> bytes:
    """Encodes a PIL image (or an HxW / HxWxC uint8 array) as PNG or JPEG bytes."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    allowed = _PNG_MODES if fmt == "png" else {"L", "RGB"}
    if image.mode not in allowed:
        image = image.convert("RGBA" if fmt == "png" and "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "jpeg" else {}
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def load_image_bytes(example: Example, reencode: str) -> bytes:
    """The bytes to store: as found (after a header check), or re-encoded when asked to.

    The header check costs microseconds and turns a broken file into an error naming it now,
    instead of a decode failure in the middle of training.
    """
    data = example.read()
    origin = example.path or f"example {example.id!r}"
    image = _pil_image(data, origin)
    if reencode == "none":
        return data
    try:
        return encode_image(image, reencode)
    except OSError as error:
        raise DataError(f"{origin} could not be re-encoded as {reencode}: {error}") from error


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


@dataclasses.dataclass(frozen=True)
class _ShardOutcome:
    split: str
    index: int
    info: ShardInfo
    skipped: bool
    reason: str  # why it was (re)written; "" when skipped


def _plan_digest(examples: Sequence[Example], reencode: str) -> str:
    digest = hashlib.sha256(f"reencode={reencode}\n".encode())
    for example in examples:
        line = json.dumps([example.id, example.label, example.source_fingerprint()])
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def sidecar_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_name(shard.name + SIDECAR_SUFFIX)


def tmp_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_name(shard.name + TMP_SUFFIX)


def _why_rewrite(shard: pathlib.Path, num_records: int,
                 digest: str) -> tuple[str, ShardInfo | None]:
    """("", info) when the shard on disk is the planned one, else (reason, None)."""
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
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable sidecar", None
    if info.file != shard.name or info.num_records != num_records:
        return "sidecar does not match the planned record count", None
    if planned != digest:
        return "the planned contents changed", None
    if file_sha256(shard) != info.sha256:
        return "sha256 does not match its sidecar", None
    try:
        if count_records(shard) != info.num_records:
            return "record count does not match its sidecar", None
    except DataError:
        return "unreadable shard", None
    return "", info


def _write_json_atomically(path: pathlib.Path, payload: dict[str, Any]) -> None:
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def _run_shard_task(task: _ShardTask) -> _ShardOutcome:
    """Skips the shard if it is already done, else writes it and then its sidecar (a worker)."""
    shard = pathlib.Path(task.path)
    digest = _plan_digest(task.examples, task.reencode)
    reason, info = _why_rewrite(shard, len(task.examples), digest)
    if info is not None:
        return _ShardOutcome(task.split, task.index, info, skipped=True, reason="")
    # Sidecar first: a crash from here on must never leave an old sidecar next to a new file.
    # The old shard goes too: write_shard's rename (epath) refuses to replace a file.
    for stale in (sidecar_path(shard), tmp_path(shard), shard):
        stale.unlink(missing_ok=True)
    records = (Record(image=load_image_bytes(e, task.reencode), label=e.label, id=e.id)
               for e in task.examples)
    info = write_shard(epath.Path(shard), records)
    _write_json_atomically(sidecar_path(shard), {**dataclasses.asdict(info), "plan_sha256": digest})
    return _ShardOutcome(task.split, task.index, info, skipped=False, reason=reason)


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

    def summary(self) -> str:
        counts = " ".join(f"{name}={split.num_records}"
                          for name, split in self.manifest.splits.items())
        removed = f", {len(self.removed)} stale files removed" if self.removed else ""
        return (f"{self.manifest.dataset}: {counts} records; {len(self.written)} shards written, "
                f"{len(self.skipped)} skipped{removed} -> {self.out_dir}")


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
            progress: bool = True) -> ConversionResult:
    """Writes ``splits`` (already in their final order) as shards plus ``manifest.json``.

    Shard assignment is ``split_evenly`` over the given order, so the same input gives
    byte-identical shards. ``label_names`` empty means unlabeled (every label UNLABELED).
    """
    if reencode not in REENCODE_CHOICES:
        raise DataError(f"reencode {reencode!r} is not one of {REENCODE_CHOICES}")
    _validate(splits, label_names)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path(out_dir).unlink(missing_ok=True)

    tasks, removed = [], []
    for split, examples in splits.items():
        count = sharding.shards_for(len(examples))
        names = [shard_name(split, index, count) for index in range(count)]
        for path in _stale_files(out_dir, split, set(names)):
            path.unlink()
            removed.append(path.name)
        for index, (name, part) in enumerate(zip(names, split_evenly(list(examples), count))):
            tasks.append(_ShardTask(split, index, str(out_dir / name), tuple(part), reencode))

    infos: dict[str, list[ShardInfo | None]] = {
        split: [None] * sum(t.split == split for t in tasks) for split in splits}
    written, skipped = [], []
    total = sum(len(examples) for examples in splits.values())
    with tqdm.tqdm(total=total, unit="img", desc=dataset, disable=not progress,
                   dynamic_ncols=True) as bar:
        for outcome in _run_tasks(tasks, workers):
            infos[outcome.split][outcome.index] = outcome.info
            (skipped if outcome.skipped else written).append(outcome.info.file)
            if outcome.reason and outcome.reason != "missing":
                bar.write(f"rewrote {outcome.info.file}: {outcome.reason}", file=sys.stderr)
            bar.update(outcome.info.num_records)

    manifest = Manifest(
        dataset=dataset, label_names=tuple(label_names),
        splits={split: SplitInfo(num_records=len(examples), shards=tuple(infos[split]))
                for split, examples in splits.items()},
        source={**source, "reencode": reencode, "sharding": sharding.describe()})
    write_manifest(out_dir, manifest)
    return ConversionResult(out_dir, manifest, tuple(sorted(written)), tuple(sorted(skipped)),
                            tuple(removed))


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
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
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


def add_holdout_arguments(parser: argparse.ArgumentParser) -> None:
    """--holdout-count | --holdout-fraction and --holdout-name: a split carved off train."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--holdout-count", type=positive_int,
                       help="hold out the last N examples of train (in the seeded order) as a "
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
                       holdout_from: str = "train") -> dict[str, list[Example]]:
    """Puts every split in the seeded order, then moves the tail of ``holdout_from`` out."""
    ordered = {name: seeded_order(examples, seed) for name, examples in splits.items()}
    if holdout_count is None and holdout_fraction is None:
        return ordered
    if holdout_from not in ordered:
        raise DataError(f"cannot hold out examples of {holdout_from!r}: the splits are "
                        f"{sorted(ordered)}")
    if holdout_name in ordered:
        raise DataError(f"held-out split name {holdout_name!r} is already a split")
    kept, held = carve_holdout(ordered[holdout_from], count=holdout_count,
                               fraction=holdout_fraction)
    ordered[holdout_from] = kept
    ordered[holdout_name] = held
    return ordered


def convert_from_args(args: argparse.Namespace, splits: Mapping[str, Sequence[Example]], *,
                      dataset: str, label_names: Sequence[str], source: Mapping[str, Any],
                      seed: int, holdout_count: int | None = None,
                      holdout_fraction: float | None = None,
                      reencode: str = "none") -> ConversionResult:
    """The tail of every converter's main: order, hold out, write, print the summary line."""
    ordered = order_and_hold_out(splits, seed=seed, holdout_count=holdout_count,
                                 holdout_fraction=holdout_fraction,
                                 holdout_name=getattr(args, "holdout_name", DEFAULT_HOLDOUT_NAME))
    result = convert(args.out, ordered, dataset=dataset, label_names=label_names, source=source,
                     sharding=sharding_from_args(args), workers=args.workers, reencode=reencode,
                     progress=not args.no_progress)
    print(result.summary())
    return result


def run_cli(body: Callable[[], object]) -> int:
    """Runs a converter body: 0 on success, 1 with a one-line ``error:`` on bad input."""
    try:
        body()
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
