"""Reliability of data preparation: bad input trees and gs:// staging, with the outcome of each.

    python benchmarks/reliability_data_prep.py [--workdir /tmp/byol_reliability_data_prep]

``data_prep_cases`` runs the real converter (``python -m byol_flax.data.convert.image_folder``) on
small bad trees built under a root: a symlink loop, a truncated JPEG (skipped, and failing with
``--on-bad-image=error``), a decompression bomb, a non-UTF-8 file name and a 16-bit PNG.
``staging_cases`` stages a dataset the way a ``gs://`` one is (``staging.copy_dataset``) onto a
disk that is too small, then twice onto one that is not. Each returns one row per case with
``as_expected``; ``main`` prints the tables and a final JSON line, exit status 1 unless every
case is as expected. A few seconds on two CPU cores.
"""

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GOOD_IMAGES = 6  # per tree: two classes of three
SUMMARY_WORDS = ("records;", "shards written")


# --- Bad trees ------------------------------------------------------------------------------------


def good_tree(root: Path, seed: int = 0) -> Path:
    """Two class folders of three tiny images each (JPEG and PNG)."""
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(GOOD_IMAGES // 2):
            pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            fmt = "JPEG" if i % 2 else "PNG"
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.{fmt.lower()}", format=fmt)
    return root


def truncated_jpeg(path: Path) -> Path:
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:-200])
    return path


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A 1x1 PNG whose header claims side x side pixels (10 gigapixels by default)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def sixteen_bit_png(path: Path) -> Path:
    Image.fromarray(np.array([[65535, 256], [0, 1000]], np.uint16)).save(path)
    return path


def non_utf8_file(directory: Path) -> bytes:
    name = os.fsencode(directory) + b"/bad\xff.png"
    with open(name, "wb") as f:
        Image.new("RGB", (3, 3)).save(f, format="PNG")
    return name


def convert(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "byol_flax.data.convert.image_folder", "--src", str(src),
            "--out", str(out), "--workers", "1", "--no-progress", *extra]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def outcome(case: str, out: Path, done: subprocess.CompletedProcess,
            check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """One row: exit status, records written, files left out, the one line a person reads."""
    from byol_flax.data.convert.writer import read_skipped_files  # noqa: PLC0415
    from byol_flax.data.records import DataError, load_manifest  # noqa: PLC0415

    try:
        records = sum(s.num_records for s in load_manifest(out).splits.values())
    except DataError:
        records = 0
    stream = done.stdout if done.returncode == 0 else done.stderr
    lines = [line for line in stream.splitlines() if line.strip()]
    row = {"case": case, "exit": done.returncode, "records": records,
           "skipped": len(read_skipped_files(out)) if out.exists() else 0,
           "message": lines[-1] if lines else ""}
    row["as_expected"] = bool(check(row))
    return row


def stored_pixels(out: Path, example_id: str) -> list[list[int]]:
    """The pixels training decodes for ``example_id`` (first channel of the RGB image)."""
    from array_record.python import array_record_module  # noqa: PLC0415

    from byol_flax.data.augment import decode_image  # noqa: PLC0415
    from byol_flax.data.records import decode_record, load_manifest  # noqa: PLC0415

    for shard in load_manifest(out).splits["train"].shards:
        reader = array_record_module.ArrayRecordReader(str(out / shard.file))
        try:
            for data in reader.read_all():
                if (record := decode_record(data)).id == example_id:
                    return np.asarray(decode_image(record.image))[..., 0].tolist()
        finally:
            reader.close()
    return []


def data_prep_cases(root: Path) -> list[dict[str, Any]]:
    """The converter on bad trees: one row per case (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)

    def tree(case: str) -> tuple[Path, Path]:
        src, out = root / case / "src", root / case / "out"
        shutil.rmtree(root / case, ignore_errors=True)
        return good_tree(src), out

    def skipped_one(row: dict[str, Any]) -> bool:
        return (row["exit"] == 0 and row["records"] == GOOD_IMAGES and row["skipped"] == 1
                and "1 files left out" in row["message"])

    rows = []
    src, out = tree("symlink_loop")
    (src / "cat" / "loop").symlink_to("..", target_is_directory=True)
    rows.append(outcome("symlink loop (cat/loop -> ..)", out, convert(src, out), skipped_one))

    src, out = tree("truncated_jpeg")
    truncated_jpeg(src / "dog" / "cut.jpg")
    rows.append(outcome("truncated JPEG", out, convert(src, out), skipped_one))
    error_out = out.with_name("out_error")
    rows.append(outcome(
        "truncated JPEG, --on-bad-image=error", error_out,
        convert(src, error_out, "--on-bad-image", "error"),
        lambda row: (row["exit"] == 1 and row["records"] == 0
                     and row["message"].startswith(
                         f"error: BadImage: bad image {src / 'dog' / 'cut.jpg'}")
                     and "truncated" in row["message"])))

    src, out = tree("decompression_bomb")
    bomb_png(src / "dog" / "bomb.png")
    rows.append(outcome("decompression bomb (10 Gpx header)", out, convert(src, out),
                        skipped_one))

    if sys.platform == "linux":
        src, out = tree("non_utf8_name")
        non_utf8_file(src / "cat")
        rows.append(outcome("non-UTF-8 file name", out, convert(src, out), skipped_one))

    src, out = tree("sixteen_bit_png")
    sixteen_bit_png(src / "dog" / "deep.png")
    rows.append(outcome(
        "16-bit PNG (65535, 256, 0, 1000)", out, convert(src, out),
        lambda row: (row["exit"] == 0 and row["records"] == GOOD_IMAGES + 1
                     and "stored as 8-bit" in row["message"]
                     and stored_pixels(out, "dog/deep.png") == [[255, 1], [0, 3]])))
    return rows


# --- Staging ------------------------------------------------------------------------------------


def staged_dataset(root: Path, payload: bytes = b"x") -> Path:
    from byol_flax.data import records  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    shards = tuple(records.write_shard(root / records.shard_name("train", i, 2),
                                       [records.Record(payload * 4096, 0, str(i))])
                   for i in range(2))
    records.write_manifest(root, records.Manifest("d", ("0",), {"train": records.SplitInfo(
        2, shards)}))
    return root


def staging_cases(root: Path) -> list[dict[str, Any]]:
    """``staging.copy_dataset`` as a gs:// start uses it: a small disk, a start, a restart."""
    from byol_flax.data import records, staging  # noqa: PLC0415
    from byol_flax.storage import files  # noqa: PLC0415
    from byol_flax.storage import staging as file_staging  # noqa: PLC0415

    shutil.rmtree(root, ignore_errors=True)
    source = staged_dataset(root / "bucket" / "ds")
    destination = root / "cache" / "ds"
    rows = []

    def small_disk(path):
        return shutil._ntuple_diskusage(10**9, 10**9 - 10**8, 10**8)  # 0.1 GB free

    with mock.patch.object(shutil, "disk_usage", small_disk):
        try:
            staging.copy_dataset(source, destination)
            message, code = "copied", 0
        except records.DataError as error:
            message, code = str(error), 1
    rows.append({"case": "disk without room", "exit": code, "message": message,
                 "as_expected": code == 1 and "not enough disk space" in message
                 and message.count(" GB") >= 2 and not destination.exists()})

    counts = {"hashed": 0, "copied": 0}

    def counting(name: str, function: Callable) -> Callable:
        def counted(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return counted

    def start(case: str, check: Callable[[dict[str, int]], bool]) -> None:
        counts.update(hashed=0, copied=0)
        started = time.perf_counter()
        with mock.patch.object(files, "sha256", counting("hashed", files.sha256)), \
                mock.patch.object(file_staging, "_copy_file", counting("copied",
                                                                       file_staging._copy_file)):
            staging.copy_dataset(source, destination)
        verified = staging.is_verified_copy(destination)
        rows.append({"case": case, "exit": 0, **counts, "verified_copy": verified,
                     "seconds": round(time.perf_counter() - started, 3),
                     "message": f"{counts['copied']} shards copied, {counts['hashed']} hashed",
                     "as_expected": verified and check(counts)})

    start("first start", lambda c: c["copied"] == 2 and c["hashed"] >= 2)
    start("restart (stamp matches)", lambda c: c["copied"] == 0 and c["hashed"] == 0)
    staged_dataset(source, payload=b"y")  # a new version of the dataset at the same path
    start("restart after the source changed", lambda c: c["copied"] == 2 and c["hashed"] >= 2)
    return rows


# --- Report -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from reliability import table  # noqa: PLC0415  (the suite's table; it imports this module)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/byol_reliability_data_prep")
    args = parser.parse_args(argv)
    root = Path(args.workdir).absolute()
    started = time.perf_counter()
    results = {"data_prep": data_prep_cases(root / "data_prep"),
               "staging": staging_cases(root / "staging")}
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["all_as_expected"] = all(row["as_expected"] for key in ("data_prep", "staging")
                                     for row in results[key])
    print("## Bad input trees (python -m byol_flax.data.convert.image_folder)")
    print(table(results["data_prep"], ["case", "exit", "records", "skipped", "as_expected",
                                       "message"]))
    print("\n## gs:// staging (staging.copy_dataset)")
    print(table(results["staging"], ["case", "exit", "copied", "hashed", "as_expected",
                                     "message"]))
    print(json.dumps(results, default=str))
    return 0 if results["all_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
