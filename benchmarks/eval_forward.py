"""Images/s of a frozen-encoder forward (what linear evaluation and feature extraction cost per
image) against the pre-training step's, on the digits config's model: the ratio the ImageNet
arithmetic in docs/performance.md assumes, measured on this host.

    python benchmarks/eval_forward.py --steps 5

Model and sizes from ``byol_flax/configs/digits_cpu.py`` (resnet_tiny at 2x width, 32-px stem,
16-px inputs, batch 128, online classifier on). The step is the paper's (LARS, EMA target) on
fixed random views, without the per-pixel device augmentation (an upper bound on its images/s);
the forward is ``make_inference_fn`` (uint8 images, inference mode), as ``extract_features`` runs
it. One untimed call compiles each; the best of ``--steps`` timed calls is reported. The ratio
counts only from a quiet machine (``benchmarks/quiet.py``; else the reason). Prints a JSON line;
``--json-out`` also writes it for ``benchmarks/report.py``.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/eval_forward.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet


def best_seconds(call: Callable[[], object], steps: int) -> float:
    """Fastest of ``steps`` timed calls after one untimed (compiling) call."""
    call()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def measure(batch: int, steps: int) -> dict:
    """Images/s of the train step and of the frozen-encoder forward at ``batch``."""
    from byol_flax.runtime.xla import configure_xla_flags  # noqa: PLC0415

    configure_xla_flags()
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from byol_flax.configs import digits_cpu  # noqa: PLC0415
    from byol_flax.evaluation import classifier as clf  # noqa: PLC0415
    from byol_flax.schedules import build_schedules  # noqa: PLC0415
    from byol_flax.sharding import make_mesh, replicate, shard_batch  # noqa: PLC0415
    from byol_flax.train_state import create_train_state  # noqa: PLC0415
    from byol_flax.train_step import StepOptions, make_train_step  # noqa: PLC0415

    config = digits_cpu.get_config()
    config.training.batch_size = batch
    size = config.data.image_size
    mesh = make_mesh()
    lr, tau = build_schedules(config, total_steps=1000, warmup_steps=10)
    graphdef, state = nnx.split(create_train_state(config, lr, num_classes=10))
    step = make_train_step(graphdef, mesh, StepOptions(lr, tau))
    rng = np.random.default_rng(0)
    views = {v: rng.normal(size=(batch, size, size, 3)).astype(np.float32)
             for v in ("view1", "view2")}
    views["label"] = rng.integers(0, 10, batch).astype(np.int32)
    sharded = shard_batch(views, mesh)
    holder = {"state": replicate(state, mesh)}

    def train() -> None:
        holder["state"], metrics = step(holder["state"], sharded)
        jax.block_until_ready(metrics)

    step_seconds = best_seconds(train, steps)
    encoder = nnx.merge(graphdef, holder["state"]).online.encoder
    apply, weights = clf.make_inference_fn(encoder, mesh)
    images = shard_batch(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), mesh)
    forward_seconds = best_seconds(lambda: jax.block_until_ready(apply(weights, images)), steps)
    return {"encoder": f"{config.model.encoder.name} x{config.model.encoder.width_multiplier}",
            "image_size": size, "batch": batch, "devices": jax.device_count(),
            "step_images_per_s": batch / step_seconds,
            "forward_images_per_s": batch / forward_seconds,
            "forward_over_step": step_seconds / forward_seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed calls after the first")
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    loads: list[quiet.Load] = []
    with quiet.watch(loads):
        result = measure(args.batch, args.steps)
    load = quiet.verdict(loads)
    result = {"benchmark": "eval_forward", **quiet.provenance(), "steps": args.steps, **result,
              "load": load, "ratio_withheld": load["reason"]}
    result["forward_over_step"] = (round(result["forward_over_step"], 1) if load["quiet"]
                                   else None)
    quiet.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
