"""Peak RSS of ``tfds_to_arrayrecord`` against the size of the split: flat, since it streams.

Each size runs in a fresh process (``--child``) that converts a synthetic TFDS-like split: a
stand-in ``tensorflow_datasets`` module whose reader yields distinct byte strings of small JPEGs
one at a time, as TFDS does with ``SkipDecoding``. The child reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``; ``--workers 1``, so no other process converts) and its
time, with the load during it (``benchmarks/quiet.py``: a time counts only from a quiet
machine); the parent prints the result JSON, which ``--json-out`` also writes for
``benchmarks/report.py``. ``--old REF`` also runs the converter as it was at git revision REF (for
the in-memory converter before streaming) on the same sizes::

    python benchmarks/convert_memory.py --sizes 5000,20000,80000 --old a64f5bf --json-out F
"""

import argparse
import importlib.util
import io
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/convert_memory.py`: benchmarks.*
    sys.path.insert(0, str(ROOT))

from benchmarks import quiet  # noqa: E402 - after the path above

CONVERTER = "byol_flax/data/convert/tfds_to_arrayrecord.py"
POOL = 64  # distinct JPEGs; every example is a fresh copy of one, as a reader's bytes are


def fake_tfds(num_examples: int, side: int) -> types.SimpleNamespace:
    """A prepared imagenet2012-like builder of ``num_examples`` JPEGs read lazily."""
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(POOL):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        pool.append(buffer.getvalue())

    class ImageFeature:
        pass

    class ClassLabel:
        def __init__(self, names: list[str]):
            self.names = names

    def as_dataset(split, shuffle_files, decoders, read_config=None):
        for index in range(num_examples):
            yield {"file_name": f"n{index % 1000:08d}_{index}.JPEG".encode(),
                   "label": index % 1000, "image": bytes(bytearray(pool[index % POOL]))}

    info = types.SimpleNamespace(
        version="5.1.0",
        splits={"train": types.SimpleNamespace(num_examples=num_examples)},
        features={"image": ImageFeature(), "file_name": None,
                  "label": ClassLabel([f"c{i}" for i in range(1000)])})
    builder = types.SimpleNamespace(name="imagenet2012", data_dir="synthetic", info=info,
                                    is_prepared=lambda: True, as_dataset=as_dataset)
    return types.SimpleNamespace(
        builder=lambda name, data_dir, try_gcs: builder,
        ReadConfig=lambda interleave_cycle_length=16: None,
        features=types.SimpleNamespace(Image=ImageFeature, ClassLabel=ClassLabel),
        decode=types.SimpleNamespace(SkipDecoding=lambda: "skip"), as_numpy=lambda ds: ds)


def _converter(old_ref: str | None) -> types.ModuleType:
    if old_ref is None:
        from byol_flax.data.convert import tfds_to_arrayrecord  # noqa: PLC0415
        return tfds_to_arrayrecord
    text = subprocess.run(["git", "show", f"{old_ref}:{CONVERTER}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "old_tfds_to_arrayrecord.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_tfds_to_arrayrecord", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def child(num_examples: int, side: int, old_ref: str | None, out: str) -> None:
    """One conversion in this process; prints a JSON line with its peak RSS and time."""
    sys.modules["tensorflow_datasets"] = fake_tfds(num_examples, side)
    converter = _converter(old_ref)
    start = time.perf_counter()
    status = converter.main(["--name", "imagenet2012", "--data-dir", out + "_tfds", "--out", out,
                             "--imagenet-holdout", "--holdout-count", str(num_examples // 100),
                             "--workers", "1", "--no-progress"])
    seconds = time.perf_counter() - start
    data_bytes = sum(p.stat().st_size for p in pathlib.Path(out).glob("*.array_record"))
    print(json.dumps({"status": status, "seconds": seconds, "shard_bytes": data_bytes,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def measure(num_examples: int, side: int, old_ref: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--child", str(num_examples), "--side", str(side),
                   "--out", str(pathlib.Path(tmp) / "out")]
        if old_ref:
            command += ["--old", old_ref]
        run = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000,80000", help="examples per run")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--old", default=None, help="git revision of the converter to compare")
    parser.add_argument("--json-out", help="also write the result JSON here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.side, args.old, args.out)
        return None
    points, loads = [], []
    for label, ref in [("streaming", None)] + ([(f"in memory ({args.old})", args.old)]
                                               if args.old else []):
        for size in [int(s) for s in args.sizes.split(",")]:
            with quiet.watch(loads):
                point = measure(size, args.side, ref)
            points.append({"converter": label, "examples": size,
                           "shard_mb": round(point["shard_bytes"] / 1e6),
                           "peak_rss_mb": round(point["peak_rss_kib"] / 1024),
                           "seconds": round(point["seconds"], 2), "load": loads[-1].as_dict()})
            print(f"{label} {size}: {points[-1]}", file=sys.stderr, flush=True)
    result = {"benchmark": "convert_memory", **quiet.provenance(), "side": args.side,
              "points": points, "load": quiet.verdict(loads)}
    quiet.emit(result, args.json_out)
    return result

if __name__ == "__main__":
    main()
