"""The BYOL step on whatever accelerator is present, and whether one host can feed it.

For the step (ResNet-50, 224 px, the paper's heads, LARS, EMA target, bfloat16 compute by
default as the accelerator configs use), from ``--batch`` up by doubling until the device runs
out of memory or ``--max-batch``: compile seconds, images/s per chip, model FLOPs utilisation
(the compiled step's FLOPs x steps/s over the chip's peak, ``PEAK_TFLOPS`` in
byol_flax/cloud/preflight.py) and peak device memory. Then one point of the same step with a
Vision Transformer encoder (ViT-S/16 at 224 px, timm's sizes, AdamW as MoCo v3 trains it:
``benchmarks/train_step.py``'s ViT recipe; per-device ``--vit-batch``, halved on running out of
memory). Then the host input pipeline at the ResNet's
size (JPEG decode + two random resized crops + flips, Grain, on sample 500x375 images this script
writes): images/s in one worker process and with one worker process per core, and the number of
host cores one chip's step consumes.

    python benchmarks/accelerator.py                       # ResNet-50, 224 px, per-device 32..
    python benchmarks/accelerator.py --tiny                # seconds on a CPU (the test suite)
    python benchmarks/accelerator.py --skip-vit            # the ResNet and the host only

Prints a markdown table and a final JSON line. On a CPU the "chip" is the host and its peak the
measured float32 matmul rate (``train_step.matmul_peak_gflops``).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from byol_flax.runtime.xla import configure_xla_flags

configure_xla_flags()  # before JAX starts, as the entry points do
import jax  # noqa: E402

from byol_flax.cloud import preflight  # noqa: E402
from byol_flax.studies.study import load_module  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent

# Devices per chip, where a JAX device is less than a chip.
DEVICES_PER_CHIP = {"TPU v2": 2, "TPU v3": 2}
# The paper's rate for reference: 1000 ImageNet epochs in ~8 h on 512 TPU v3 cores (Section 4).
PAPER_IMAGES_PER_SECOND_PER_V3_CHIP = 1000 * 1281167 / (8 * 3600) / 256



# Modules of benchmarks/ (not a package), by file.
train_step = load_module(BENCHMARKS / "train_step.py", "train_step")  # step builder, CPU peak
data_pipeline = load_module(BENCHMARKS / "data_pipeline.py", "data_pipeline")  # host pipeline


def peak_tflops(kind: str) -> tuple[float | None, str]:
    """(peak per JAX device, where it comes from) for ``device_kind`` ``kind``."""
    value = preflight.peak_tflops(kind)
    if value is not None:
        return value, f"bfloat16 dense peak of {kind}"
    if jax.default_backend() == "cpu":
        return train_step.matmul_peak_gflops() / 1e3, "measured float32 matmul"
    return None, f"no peak known for {kind!r}: add it to preflight.PEAK_TFLOPS"


def _out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def measure_step(args: argparse.Namespace, per_device_batch: int) -> dict:
    """One batch size: compile, then ``args.steps`` timed steps on fixed random views."""
    batch = per_device_batch * jax.device_count()
    _, state, step, mesh = train_step.build_step(args.encoder, args.stem, batch,
                                                 dtype=args.dtype, image_size=args.image_size)
    (views,) = train_step.random_views(batch, args.image_size, mesh, count=1)
    start = time.perf_counter()
    compiled = step.lower(state, views).compile()
    compile_seconds = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops")
    state, metrics = compiled(state, views)  # first run: allocation, autotuning
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, views)
    loss = float(jax.device_get(metrics["loss"]))
    seconds = (time.perf_counter() - start) / args.steps
    memory = jax.devices()[0].memory_stats() or {}
    return {"per_device_batch": per_device_batch, "global_batch": batch,
            "compile_seconds": round(compile_seconds, 1), "step_seconds": seconds,
            "step_tflop": flops / 1e12 if flops else None, "loss": loss,
            "peak_device_memory_gib": round(memory["peak_bytes_in_use"] / 2**30, 2)
            if "peak_bytes_in_use" in memory else None}


def rate_row(row: dict, peak: float | None, chips: float) -> dict:
    """``row`` with images/s per chip and model FLOPs utilisation against ``peak`` per device."""
    row["images_per_second_per_chip"] = row["global_batch"] / row["step_seconds"] / chips
    row["mfu"] = (row["step_tflop"] / row["step_seconds"] / (peak * jax.device_count())
                  if row["step_tflop"] and peak else None)
    return row


def measure_vit(args: argparse.Namespace, peak: float | None, chips: float) -> dict:
    """The ViT point: per-device ``args.vit_batch``, halved until it fits in device memory."""
    vit_args = argparse.Namespace(**{**vars(args), "encoder": args.vit_encoder,
                                     "stem": args.vit_stem, "image_size": args.vit_image_size})
    rows, batch = [], args.vit_batch
    while batch >= 1 and not rows:
        try:
            rows.append(rate_row(measure_step(vit_args, batch), peak, chips))
        except Exception as error:
            if not _out_of_memory(error):
                raise
            print(f"{args.vit_encoder} per-device batch {batch}: out of device memory", flush=True)
            batch //= 2
    for row in rows:
        print(f"{args.vit_encoder} per-device batch {row['per_device_batch']}: "
              f"{row['images_per_second_per_chip']:.1f} img/s per chip, MFU "
              f"{row['mfu'] or float('nan'):.3f}", flush=True)
    return {"encoder": args.vit_encoder, "stem": args.vit_stem, "image_size": args.vit_image_size,
            "optimizer": train_step.recipe(args.vit_encoder)["optimizer"], "rows": rows}


def measure_host_pipeline(args: argparse.Namespace) -> dict:
    """Decode + crop + flip at ``args.image_size`` in one worker process (one core) and in one
    worker process per core (the host)."""
    from absl import flags

    from byol_flax.config import base_config
    from byol_flax.data.pipeline import open_split

    flags.FLAGS.mark_as_parsed()
    cores = len(os.sched_getaffinity(0))
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_pipeline.write_sample_data(Path(tmp), args.host_images)
        config = base_config()
        config.data.dir = tmp
        config.data.image_size = args.image_size
        config.training.batch_size = args.host_batch
        config.data.prefetch_buffer_size = 2
        opened = open_split(config.data, "train")
        for workers in sorted({1, cores}):
            config.data.worker_count = workers
            rates[workers] = data_pipeline.host_images_per_second(config, opened,
                                                                 args.host_batches)
    return {"host_cores": cores, "per_core_images_per_second": round(rates[1], 1),
            "per_host_images_per_second": round(rates[cores], 1)}


def run(args: argparse.Namespace) -> dict:
    device = jax.devices()[0]
    kind = device.device_kind
    peak, peak_source = peak_tflops(kind)
    per_chip = DEVICES_PER_CHIP.get(next((p for p in DEVICES_PER_CHIP if kind.startswith(p)),
                                         ""), 1)
    chips = jax.device_count() / per_chip
    rows, batch = [], args.batch
    while batch <= args.max_batch:
        try:
            row = measure_step(args, batch)
        except Exception as error:
            if not _out_of_memory(error):
                raise
            print(f"per-device batch {batch}: out of device memory", flush=True)
            break
        rows.append(rate_row(row, peak, chips))
        print(f"per-device batch {batch}: {row['images_per_second_per_chip']:.1f} img/s per "
              f"chip, MFU {row['mfu'] or float('nan'):.3f}", flush=True)
        batch *= 2
    best = max(rows, key=lambda r: r["images_per_second_per_chip"]) if rows else None
    vit = measure_vit(args, peak, chips) if not args.skip_vit else None
    host = measure_host_pipeline(args) if not args.skip_host else None
    result = {
        "benchmark": "accelerator", "device_kind": kind, "devices": jax.device_count(),
        "chips": chips, "platform": jax.default_backend(), "jax": jax.__version__,
        "encoder": args.encoder, "stem": args.stem, "image_size": args.image_size,
        "dtype": args.dtype, "peak_tflops_per_device": peak, "peak_source": peak_source,
        "rows": rows, "best": best, "vit": vit, "host": host,
        "paper_images_per_second_per_v3_chip": round(PAPER_IMAGES_PER_SECOND_PER_V3_CHIP, 1)}
    if best and host:
        chip_rate = best["images_per_second_per_chip"]
        result["host_cores_per_chip"] = round(chip_rate / host["per_core_images_per_second"], 3)
        result["host_over_chip"] = round(host["per_host_images_per_second"] / chip_rate, 2)
    return result


def print_rows(rows: list[dict]) -> None:
    print("| per-device batch | images/s per chip | MFU | compile s | step TFLOP | peak device "
          "memory GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        tflop = f"{row['step_tflop']:.2f}" if row["step_tflop"] else "-"
        print(f"| {row['per_device_batch']} | {row['images_per_second_per_chip']:.1f} | {mfu} | "
              f"{row['compile_seconds']} | {tflop} | {row['peak_device_memory_gib'] or '-'} |")


def print_table(result: dict) -> None:
    print(f"\n{result['devices']}x {result['device_kind']} ({result['platform']}, jax "
          f"{result['jax']}); {result['encoder']} {result['image_size']} px {result['dtype']}; "
          f"peak {result['peak_tflops_per_device'] or float('nan'):.4g} TFLOP/s per device "
          f"({result['peak_source']})")
    print_rows(result["rows"])
    vit = result["vit"]
    if vit:
        print(f"\n{vit['encoder']} ({vit['stem']} stem) {vit['image_size']} px {result['dtype']}, "
              f"{vit['optimizer']}:")
        print_rows(vit["rows"])
    host = result["host"]
    if host:
        print(f"\nHost pipeline at {result['image_size']} px: {host['per_core_images_per_second']}"
              f" img/s in one worker process, {host['per_host_images_per_second']} with "
              f"{host['host_cores']} (one per core); one chip's best step needs "
              f"{result.get('host_cores_per_chip', '-')} cores; this host feeds "
              f"{result.get('host_over_chip', '-')}x one chip's consumption.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batch", type=int, default=32, help="first per-device batch")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest per-device batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    parser.add_argument("--host-images", type=int, default=256)
    parser.add_argument("--host-batch", type=int, default=32)
    parser.add_argument("--host-batches", type=int, default=16)
    parser.add_argument("--skip-host", action="store_true")
    parser.add_argument("--vit-encoder", default="vit_small")
    parser.add_argument("--vit-stem", default="imagenet", help="imagenet: 16-px patches")
    parser.add_argument("--vit-image-size", type=int, default=224)
    parser.add_argument("--vit-batch", type=int, default=256,
                        help="the ViT point's per-device batch (halved until it fits)")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="resnet_tiny and vit_micro (4-px patches) at 32 px in float32, "
                        "one per-device batch of 2, 2 steps: a CPU smoke run of every part (the "
                        "test suite's)")
    parser.add_argument("--json-out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.tiny:
        # float32: bfloat16 is emulated on a CPU (slower to compile and run, not smaller).
        args.encoder, args.stem, args.image_size, args.dtype = "resnet_tiny", "small", 32, "float32"
        args.batch, args.max_batch, args.steps = 2, 2, 2
        args.vit_encoder, args.vit_stem, args.vit_image_size, args.vit_batch = (
            "vit_micro", "small", 32, 2)
        args.host_images, args.host_batch, args.host_batches = 64, 8, 6
    result = run(args)
    print_table(result)
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
