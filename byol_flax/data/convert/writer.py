"""The resumable, parallel shard writer every converter ends with.

A converter only has to turn its source into ``{split: [Example, ...]}`` plus label names, put
in their final order (:mod:`byol_flax.data.convert.order`); :func:`convert` assigns examples to
shards (``split_evenly``), writes the shards in worker processes and finishes with
``manifest.json``. :func:`write_planned` takes splits made shard by shard instead (a streamed
source), holding only the shards in flight.

Resuming: next to every finished shard lies ``<shard>.json``, a sidecar with its ShardInfo and a
digest of what the plan put in it (ids, labels, source sizes, re-encoding). A re-run skips a shard
only when its file still matches the sidecar (sha256 and record count) and the sidecar matches the
plan; a missing or damaged shard, a stale ``.tmp`` or a changed plan means it is written again.
The manifest is removed when a conversion starts and written when it ends, so a directory with a
manifest is always complete. Images left out as bad are listed in ``skipped_files.json``.
"""

import dataclasses
import functools
import hashlib
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

from byol_flax.data.convert.image_io import (
    REENCODE_CHOICES,
    BadImage,
    Example,
    ImagePolicy,
    SkippedFile,
    load_image_bytes,
)
from byol_flax.data.records import (
    UNLABELED,
    DataError,
    Manifest,
    Record,
    ShardInfo,
    SplitInfo,
    count_records,
    file_sha256,
    manifest_path,
    shard_name,
    split_evenly,
    write_manifest,
    write_shard,
)
from byol_flax.runtime.outputs import claim_output_dir
from byol_flax.storage import files, json_files, schemas

DEFAULT_EXAMPLES_PER_SHARD = 1024
# Conversion is mostly file I/O and hashing; more than 16 processes rarely helps.
DEFAULT_WORKERS = max(1, min(16, os.cpu_count() or 1))
SIDECAR_SUFFIX = ".json"
TMP_SUFFIX = ".tmp"
# Split names become file-name prefixes, and "-" separates the prefix from the shard index.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.]+")
SKIPPED_FILES_NAME = "skipped_files.json"
# How many ids of converted 16-bit images the manifest lists (the count is always exact).
_LISTED_IDS = 20


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
        meta = json_files.read(sidecar, spec=dict, what="shard sidecar")
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
    json_files.write(path, payload, indent=2, sort_keys=True)


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


def _run_tasks(tasks: Iterable[_ShardTask], num_tasks: int,
               workers: int) -> Iterator[_ShardOutcome]:
    """Runs tasks as they are made; at most ``2 * workers`` are in flight (shards in memory)."""
    if workers <= 1 or num_tasks <= 1:
        for task in tasks:
            yield _run_shard_task(task)
        return
    # "spawn": the caller may have started JAX/TF threads, which fork() does not survive.
    context = multiprocessing.get_context("spawn")
    workers = min(workers, num_tasks)
    with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: set[futures.Future] = set()
        try:
            for task in tasks:
                pending.add(pool.submit(_run_shard_task, task))
                if len(pending) >= 2 * workers:
                    done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            for future in futures.as_completed(pending):
                yield future.result()
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


@dataclasses.dataclass(frozen=True)
class PlannedSplit:
    """A split to write: its size, and a function from a shard count to the shards' examples in
    their final order, made one shard at a time (a streamed split is never all in memory)."""

    num_examples: int
    shards: Callable[[int], Iterable[Sequence[Example]]]


def _even_shards(examples: Sequence[Example], num_shards: int) -> list[Sequence[Example]]:
    return split_evenly(list(examples), num_shards)


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
    planned = {split: PlannedSplit(len(examples), functools.partial(_even_shards, examples))
               for split, examples in splits.items()}
    return write_planned(out_dir, planned, dataset=dataset, label_names=label_names,
                         source=source, sharding=sharding, workers=workers, reencode=reencode,
                         progress=progress, policy=policy, left_out=left_out)


def claim(out_dir: os.PathLike | str) -> pathlib.Path:
    """Claims ``out_dir`` for a conversion and removes its manifest (complete only at the end).

    A new or empty directory, or an earlier (perhaps killed) conversion: never a user's files.
    """
    out_dir = pathlib.Path(claim_output_dir(out_dir, "dataset"))
    manifest_path(out_dir).unlink(missing_ok=True)
    return out_dir


def _check_planned(planned: Mapping[str, PlannedSplit], reencode: str) -> None:
    if reencode not in REENCODE_CHOICES:
        raise DataError(f"reencode {reencode!r} is not one of {REENCODE_CHOICES}")
    if not planned:
        raise DataError("nothing to convert: no splits")
    for split, plan in planned.items():
        if not _SPLIT_NAME.fullmatch(split):
            raise DataError(f"split name {split!r} may only hold letters, digits, '_' and '.'")
        if plan.num_examples <= 0:
            raise DataError(f"split {split!r} has no examples")


def _tasks(out_dir: pathlib.Path, planned: Mapping[str, PlannedSplit],
           names: Mapping[str, list[str]], label_names: Sequence[str], reencode: str,
           policy: ImagePolicy) -> Iterator[_ShardTask]:
    """The shard tasks, each made when the writer is ready for it."""
    for split, plan in planned.items():
        sizes = [len(part) for part in split_evenly(range(plan.num_examples), len(names[split]))]
        for index, (name, part) in enumerate(zip(names[split], plan.shards(len(names[split])))):
            part = tuple(part)
            if len(part) != sizes[index]:
                raise DataError(f"split {split!r}: shard {index} got {len(part)} examples, "
                                f"planned {sizes[index]}")
            for example in part:
                if not (example.label == UNLABELED if not label_names
                        else 0 <= example.label < len(label_names)):
                    raise DataError(f"split {split!r}: example {example.id!r} has label "
                                    f"{example.label}, outside the {len(label_names)} label "
                                    "names")
            yield _ShardTask(split, index, str(out_dir / name), part, reencode, policy)


def write_planned(out_dir: os.PathLike | str, planned: Mapping[str, PlannedSplit], *,
                  dataset: str, label_names: Sequence[str], source: Mapping[str, Any],
                  sharding: Sharding = Sharding(), workers: int = 1, reencode: str = "none",
                  progress: bool = True, policy: ImagePolicy = ImagePolicy(),
                  left_out: Sequence[SkippedFile] = ()) -> ConversionResult:
    """:func:`convert` for splits made shard by shard: memory holds the shards in flight."""
    _check_planned(planned, reencode)
    out_dir = claim(out_dir)
    names, removed = {}, []
    for split, plan in planned.items():
        count = sharding.shards_for(plan.num_examples)
        names[split] = [shard_name(split, index, count) for index in range(count)]
        for path in _stale_files(out_dir, split, set(names[split])):
            path.unlink()
            removed.append(path.name)

    infos: dict[str, list[ShardInfo | None]] = {
        split: [None] * len(split_names) for split, split_names in names.items()}
    written, skipped, all_left_out, converted = [], [], list(left_out), []
    total = sum(plan.num_examples for plan in planned.values())
    tasks = _tasks(out_dir, planned, names, label_names, reencode, policy)
    with tqdm.tqdm(total=total, unit="img", desc=dataset, disable=not progress,
                   dynamic_ncols=True) as bar:
        for outcome in _run_tasks(tasks, sum(map(len, names.values())), workers):
            infos[outcome.split][outcome.index] = outcome.info
            (skipped if outcome.skipped else written).append(outcome.info.file)
            all_left_out.extend(outcome.left_out)
            converted.extend(outcome.converted)
            if outcome.reason and outcome.reason != "missing":
                bar.write(f"rewrote {outcome.info.file}: {outcome.reason}", file=sys.stderr)
            bar.update(outcome.info.num_records + len(outcome.left_out))
    return _finish(out_dir, infos, dataset=dataset, label_names=label_names, source=source,
                   sharding=sharding, reencode=reencode, policy=policy, written=written,
                   skipped=skipped, removed=removed, left_out=all_left_out, converted=converted)


def _finish(out_dir: pathlib.Path, infos: Mapping[str, list[ShardInfo]], *, dataset: str,
            label_names: Sequence[str], source: Mapping[str, Any], sharding: Sharding,
            reencode: str, policy: ImagePolicy, written: list[str], skipped: list[str],
            removed: list[str], left_out: list[SkippedFile],
            converted: list[str]) -> ConversionResult:
    """Writes ``skipped_files.json`` and then the manifest, which marks the output complete."""
    left_out.sort(key=lambda item: item.file)
    _write_skipped_files(out_dir, left_out)
    split_infos = {split: SplitInfo(num_records=sum(i.num_records for i in shard_infos),
                                    shards=tuple(shard_infos))
                   for split, shard_infos in infos.items()}
    if empty := [split for split, info in split_infos.items() if not info.num_records]:
        raise DataError(f"split {empty[0]!r}: every image was left out as bad; see "
                        f"{out_dir / SKIPPED_FILES_NAME}")
    extra: dict[str, Any] = {"max_image_pixels": policy.max_pixels,
                             "left_out_files": len(left_out)}
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
                            tuple(removed), tuple(left_out), tuple(converted))


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
    if not files.exists(path):
        return []
    try:
        listed = json_files.read(path, spec=schemas.Obj({"files": schemas.ListOf(dict)}),
                                 what="skipped-files list")["files"]
        return [SkippedFile(**item) for item in listed]
    except files.StorageError as error:
        raise DataError(str(error)) from None
    except TypeError as error:
        raise DataError(f"{path} is not a skipped-files list: {error!r}") from error
