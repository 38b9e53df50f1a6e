"""Input pipeline throughput: host decode + crop + flip, and on-device photometric augmentation.

Generates its own sample data (JPEG images of ImageNet-like size, 500x375, written as ArrayRecord
shards in a temporary directory), then measures:
  * host images/s per worker of the Grain training pipeline (decode + two random resized crops
    + flips) at 224 px and 32 px, in-process (one worker) and with ``--workers`` processes;
  * on-device images/s of the Table 6 photometric augmentations (both views) at 224 and 32 px.
With ``--step-json`` (result files of ``benchmarks/train_step.py --json-out``), each step's
consumption (its images/s) is set against the host pipeline at ``--workers`` workers and the same
image size: the target is a pipeline at least 2x faster than the step consumes. Prints a table and
a final JSON line. Usage:

    python benchmarks/data_pipeline.py [--images 512] [--workers 2] [--batch 64] \
        [--sizes 224,64,32] [--step-json r18.json r50.json] [--source-size 4032x3024] \
        [--reduced-decode] [--json-out F]

``--source-size`` sets the generated JPEGs' size (a phone photo is 4032x3024);
``--reduced-decode`` sets ``config.augment.crop_reduced_decode`` (DCT-scaled decoding);
``--json-out`` also writes the result for ``benchmarks/report.py``.
"""

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/data_pipeline.py`: benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet
from byol_flax.runtime.xla import configure_xla_flags

configure_xla_flags()  # before JAX starts: the step it is compared with runs with them
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from byol_flax.config import base_config  # noqa: E402
from byol_flax.data import records  # noqa: E402
from byol_flax.data.augment import make_device_augment  # noqa: E402
from byol_flax.data.pipeline import open_split, train_dataset  # noqa: E402


def sample_jpeg(rng: np.random.Generator, width=500, height=375) -> bytes:
    """A smooth random image with texture: decodes like a photo, not like white noise."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(rng.uniform(2, 12) * xx + rng.uniform(2, 12) * yy + rng.uniform(0, 6))
                for _ in range(3)]
    pixels = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (height, width, 3)))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_sample_data(directory: Path, count: int, num_shards: int = 4,
                      source_size: tuple[int, int] = (500, 375)) -> None:
    rng = np.random.default_rng(0)
    examples = [records.Record(sample_jpeg(rng, *source_size), i % 10, f"sample/{i}")
                for i in range(count)]
    shards = [records.write_shard(directory / records.shard_name("train", i, num_shards), chunk)
              for i, chunk in enumerate(records.split_evenly(examples, num_shards))]
    records.write_manifest(directory, records.Manifest(
        "benchmark", tuple(str(i) for i in range(10)),
        {"train": records.SplitInfo(count, tuple(shards))}, {"generator": "sample_jpeg"}))


def host_images_per_second(config, opened, batches: int, warmup: int = 4) -> float:
    """Steady-state rate: start-up and the first batches (filling buffers) are not timed."""
    iterator = iter(train_dataset(config, opened))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.training.batch_size / (time.perf_counter() - start)


def device_images_per_second(config, size: int, batch: int, repeats: int = 5) -> float:
    augment = jax.jit(make_device_augment(config.augment))
    crops = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    views = {"view1": jax.device_put(crops), "view2": jax.device_put(crops)}
    jax.block_until_ready(augment(jax.random.key(0), views))
    start = time.perf_counter()
    for i in range(repeats):
        jax.block_until_ready(augment(jax.random.key(i), views))
    return repeats * batch / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sizes", default="224,64,32", help="crop sizes, px")
    parser.add_argument("--step-json", nargs="*", default=[],
                        help="train_step.py results whose consumption to compare against")
    parser.add_argument("--timed-batches", type=int, default=24,
                        help="batches timed per measurement (the data repeats)")
    parser.add_argument("--source-size", default="500x375", help="generated JPEGs, WxH px")
    parser.add_argument("--reduced-decode", action="store_true",
                        help="config.augment.crop_reduced_decode = True")
    parser.add_argument("--json-out", help="also write the result JSON here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    flags.FLAGS.mark_as_parsed()
    steps = [json.loads(Path(path).read_text()) for path in args.step_json]
    for step in steps:  # a --compare-torch result: our step's row
        if "results" in step:
            step.update(impl="jax", images_per_second=step["results"]["jax"]["images_per_second"])
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {s["image_size"] for s in steps},
                   reverse=True)

    source_size = tuple(int(v) for v in args.source_size.lower().split("x"))
    result = {"benchmark": "data_pipeline", **quiet.provenance(), "workers": args.workers,
              "sizes": sizes, "source_image": f"JPEG {args.source_size}",
              "reduced_decode": args.reduced_decode,
              "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
              "host_cpus": len(__import__("os").sched_getaffinity(0))}
    rows = []
    loads: list[quiet.Load] = []
    with tempfile.TemporaryDirectory() as tmp, quiet.watch(loads):
        write_sample_data(Path(tmp), args.images, source_size=source_size)
        for size in sizes:
            config = base_config()
            config.data.dir = tmp
            config.data.image_size = size
            config.augment.crop_reduced_decode = args.reduced_decode
            config.training.batch_size = args.batch
            # A small prefetch buffer, so read-ahead cannot hide the per-image cost.
            config.data.prefetch_buffer_size = 2
            opened = open_split(config.data, "train")
            batches = args.timed_batches
            for workers in (0, args.workers):
                config.data.worker_count = workers
                rate = host_images_per_second(config, opened, batches)
                per_worker = rate / max(workers, 1)
                key = f"host_{size}px_{workers}workers"
                result[f"{key}_images_per_second"] = round(rate, 1)
                result[f"{key}_images_per_second_per_worker"] = round(per_worker, 1)
                rows.append((f"host decode+crop+flip {size}px", workers or "in-process", rate,
                             per_worker))
            device_rate = device_images_per_second(config, size, args.batch)
            result[f"device_augment_{size}px_images_per_second"] = round(device_rate, 1)
            rows.append((f"device photometric {size}px", "-", device_rate, device_rate))
    print(f"{'stage':<32} {'workers':>10} {'images/s':>10} {'per worker':>11}")
    for stage, workers, rate, per_worker in rows:
        print(f"{stage:<32} {workers!s:>10} {rate:>10.1f} {per_worker:>11.1f}")
    # A ratio against a step measured elsewhere counts when both were measured quietly.
    load = quiet.verdict(loads + [quiet.Load(0.0, 1, step["load"]["max_other_share"], 0.0,
                                             None, None) for step in steps if "load" in step])
    result["load"] = load
    consumption = []
    for step in steps:
        size = step["image_size"]
        host = result[f"host_{size}px_{args.workers}workers_images_per_second"]
        device = result[f"device_augment_{size}px_images_per_second"]
        consumption.append({
            "step": f"{step['encoder']} {size}px batch {step['batch']} ({step['impl']})",
            "step_images_per_second": step["images_per_second"], "workers": args.workers,
            "host_pipeline_images_per_second": host,
            "host_over_step": round(host / step["images_per_second"], 2) if load["quiet"]
            else None,
            "device_augment_over_step": round(device / step["images_per_second"], 2)
            if load["quiet"] else None,
            "target_host_at_least_2x": host >= 2 * step["images_per_second"]})
    if consumption:
        print(f"\n{'step':<40} {'consumes':>9} {'host pipeline':>14} {'ratio':>6}")
        for row in consumption:
            print(f"{row['step']:<40} {row['step_images_per_second']:>9.1f} "
                  f"{row['host_pipeline_images_per_second']:>14.1f} "
                  f"{row['host_over_step'] or '-':>6}")
        if not load["quiet"]:
            print(f"no ratio: {load['reason']}")
        result["step_consumption"] = consumption
    quiet.emit(result, args.json_out)


if __name__ == "__main__":
    main()
