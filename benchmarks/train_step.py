"""Times the jitted BYOL step: images/s, compile seconds and peak RSS, ending in one JSON line.

Default: ResNet-18 with the small-image stem, 32x32 inputs, global batch 128, paper heads
(4096 -> 256), float32, LARS, on every local device. Usage:

    python benchmarks/train_step.py [--encoder resnet18] [--batch 128] [--image-size 32] [--steps 5]
"""

import argparse
import json
import platform
import resource
import time

import jax
import numpy as np
from flax import nnx

from byol_flax.config import base_config
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicate, shard_batch
from byol_flax.train_state import create_train_state
from byol_flax.train_step import make_train_step


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--stem", default="small", choices=["small", "imagenet"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the compile")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    config = base_config()
    config.model.encoder.name = args.encoder
    config.model.encoder.stem = args.stem
    config.model.compute_dtype = args.dtype
    config.training.batch_size = args.batch
    mesh = make_mesh()
    lr, tau = build_schedules(config, total_steps=1000, warmup_steps=10)
    graphdef, state = nnx.split(create_train_state(config, lr))
    state = replicate(state, mesh)
    step = make_train_step(graphdef, mesh, learning_rate=lr, target_ema=tau,
                           accumulation_steps=args.accumulation_steps)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    batch = shard_batch({v: rng.normal(size=shape).astype(np.float32)
                         for v in ("view1", "view2")}, mesh)

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up run, not timed
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    flops = (compiled.cost_analysis() or {}).get("flops") if hasattr(compiled, "cost_analysis") else None
    result = {
        "benchmark": "train_step",
        "encoder": args.encoder, "stem": args.stem, "image_size": args.image_size,
        "batch": args.batch, "dtype": args.dtype, "accumulation_steps": args.accumulation_steps,
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "platform": jax.default_backend(), "host": platform.processor() or platform.machine(),
        "jax": jax.__version__, "steps_timed": args.steps,
        "step_seconds_median": round(median, 4),
        "images_per_second": round(args.batch / median, 2),
        "compile_seconds": round(compile_seconds, 2),
        "step_gflop": round(flops / 1e9, 1) if flops else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "loss": float(metrics["loss"]),
    }
    print(f"{'images/s':>10} {'step s':>8} {'compile s':>10} {'peak RSS MiB':>13}")
    print(f"{result['images_per_second']:>10} {result['step_seconds_median']:>8} "
          f"{result['compile_seconds']:>10} {result['peak_rss_mib']:>13}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
