"""The BYOL step sharded over 1, 2, 4 and 8 host CPU devices: images/s and numerics.

Each device count runs in its own process (``--xla_force_host_platform_device_count`` must be
set before JAX starts), from the same initial state and the same global batch, for ``--steps``
steps. Reported per count: images/s (the devices share this machine's cores, so this shows the
cost of partitioning and of the cross-device BatchNorm reductions, not a speed-up), compile
seconds, the loss of every step, and the largest difference of any parameter from the 1-device
run. Numerics are "equal" when the losses agree to ``--rtol`` and parameters to ``--atol``
(reduction order differs between partitionings, so bitwise equality is not expected).

    python benchmarks/sharded_step.py [--encoder resnet18 --image-size 32 --batch 64 --steps 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax
    import numpy as np
    from flax import nnx
    from train_step import build_step, random_views  # this folder: the same step and views

    graphdef, state, step, mesh = build_step(args.encoder, args.stem, args.batch,
                                             total_steps=100, warmup_steps=2,
                                             image_size=args.image_size)  # a ViT's positions
    batches = random_views(args.batch, args.image_size, mesh, count=args.steps)
    losses, times = [], []
    for batch in batches:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
    params = nnx.state(nnx.merge(graphdef, state).online, nnx.Param)
    np.savez(args.params_out, **{jax.tree_util.keystr(path): np.asarray(leaf)
                                 for path, leaf in jax.tree_util.tree_leaves_with_path(params)})
    timed = times[1:] or times
    Path(args.json_out).write_text(json.dumps({
        "devices": jax.device_count(), "losses": losses, "compile_seconds": times[0] - min(timed),
        "images_per_second": args.batch / sorted(timed)[len(timed) // 2],
        "compilations": step._cache_size()}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--stem", default="small", choices=["small", "imagenet"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="global; divisible by 8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device-counts", default="1,2,4,8")
    parser.add_argument("--rtol", type=float, default=1e-4, help="losses")
    parser.add_argument("--atol", type=float, default=1e-4, help="parameters")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--params-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in [int(c) for c in args.device_counts.split(",")]:
            out, params = Path(tmp) / f"{count}.json", Path(tmp) / f"{count}.npz"
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
            subprocess.run([sys.executable, __file__, "--worker", f"--encoder={args.encoder}",
                            f"--stem={args.stem}", f"--image-size={args.image_size}",
                            f"--batch={args.batch}", f"--steps={args.steps}",
                            f"--json-out={out}", f"--params-out={params}"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            rows.append(json.loads(out.read_text()) | {"params": dict(np.load(params))})
    reference = rows[0]
    for row in rows:
        row["max_param_difference"] = max(
            float(np.max(np.abs(row["params"][k] - reference["params"][k])))
            for k in reference["params"])
        row["max_loss_relative_difference"] = max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["losses"], reference["losses"]))
        row["numerics_equal"] = (row["max_loss_relative_difference"] <= args.rtol
                                 and row["max_param_difference"] <= args.atol)
    for row in rows:
        del row["params"]
    print(f"{args.encoder} {args.image_size}px global batch {args.batch}, {args.steps} steps, "
          f"devices sharing {os.cpu_count()} CPU cores")
    print(f"{'devices':>7} {'images/s':>9} {'compile s':>10} {'max |dloss|/loss':>17} "
          f"{'max |dparam|':>13} {'equal':>6}")
    for row in rows:
        print(f"{row['devices']:>7} {row['images_per_second']:>9.2f} "
              f"{row['compile_seconds']:>10.1f} {row['max_loss_relative_difference']:>17.2e} "
              f"{row['max_param_difference']:>13.2e} {str(row['numerics_equal']):>6}")
    result = {"benchmark": "sharded_step", "encoder": args.encoder, "image_size": args.image_size,
              "batch": args.batch, "steps": args.steps, "rtol": args.rtol, "atol": args.atol,
              "rows": rows, "all_equal": all(r["numerics_equal"] for r in rows)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
