"""The BYOL train step: images/s, compile seconds, peak RSS, FLOPs and the fraction of a measured
matmul peak, for our jitted step and (optionally) the same step in plain PyTorch.

Presets (sizes whose step takes seconds on a 2-core CPU; every field can be overridden by its flag):
  ``--model resnet18``: ResNet-18, 32-px (small-image) stem, 32x32 inputs, global batch 128;
  ``--model resnet50``: ResNet-50, ImageNet stem, 64x64 inputs, global batch 32;
  ``--model vit_micro``: byol_flax's CPU-sized ViT (width 64, depth 4), 4-px patches ("small"
  stem), 32x32 inputs, global batch 128;
  ``--model vit_small``: ViT-S/16 (timm's: 6 heads), 16-px patches ("imagenet" stem), 64x64
  inputs (16 patches + class token; 224 px is the accelerator's size), global batch 32.
Paper heads (4096 -> 256), EMA target, float32 unless ``--dtype``. The optimizer and target decay
are the encoder's recipe unless ``--optimizer`` / ``--base-lr`` / ``--weight-decay`` / ``--tau``:
ResNets the paper's (LARS, base LR 0.2, decay 1.5e-6, tau 0.996), ViTs MoCo v3's for BYOL
(AdamW, base LR 1e-4, decay 0.03, tau 0.99: byol_flax/configs/byol_vit_imagenet.py); the LR is
base x batch / 256 on both sides (ours warms up to it over 10 steps; the cost does not change).
ViTs use the config's defaults (fixed sin-cos position embedding, trained patch projection); the
PyTorch side is timm's ``VisionTransformer`` built to match (``benchmarks/torch_byol.py``), and
the comparison fails unless both sides report the same architecture and trainable parameters.

    python benchmarks/train_step.py --model resnet18                 # our step only
    python benchmarks/train_step.py --model resnet50 --compare-torch --rounds 2
    python benchmarks/train_step.py --model vit_small --compare-torch --rounds 1

``--compare-torch`` (needs the ``torch`` extra: ``pip install -e '.[torch]'``) runs each variant
(ours, torch eager, torch.compile) in its own process, interleaved in rotated order for
``--rounds`` rounds (A/B/C, C/A/B, ...; at least 3), and reports medians, spreads and the ratio
of ours to the best PyTorch mode, only when every process ran on a quiet machine
(``benchmarks/quiet.py``: other processes' CPU time, steal, load average); otherwise the reason,
and exit status 3.
Each process: one untimed first step (tracing + compilation, reported as compile seconds), then
``--steps`` timed steps on fixed random views. Prints a table and a final JSON line.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/train_step.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet

PRESETS = {
    "resnet18": {"encoder": "resnet18", "stem": "small", "image_size": 32, "batch": 128},
    "resnet50": {"encoder": "resnet50", "stem": "imagenet", "image_size": 64, "batch": 32},
    "vit_micro": {"encoder": "vit_micro", "stem": "small", "image_size": 32, "batch": 128},
    "vit_small": {"encoder": "vit_small", "stem": "imagenet", "image_size": 64, "batch": 32},
}
RECIPE_KEYS = ("optimizer", "base_lr", "weight_decay", "tau")
IMPLEMENTATIONS = ("jax", "torch-eager", "torch-compile")
MIN_ROUNDS = 3  # interleaved rounds before a ratio is reported (median and spread)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float | None:
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``jnp.dot`` rate at size^3 on the default device: the roofline we compare
    the step against."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def time_steps(run_step, steps: int, memory: dict) -> tuple[float, list[float]]:
    """(first call seconds, timed step seconds); ``run_step`` blocks until its step is done.

    ``memory`` gets the peak RSS before the first call (model and optimizer state built), after
    it (compilation) and the RSS after the timed steps (steady state), in MiB.
    """
    memory["peak_rss_before_first_step_mib"] = round(peak_rss_mib(), 1)
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start
    memory["peak_rss_after_first_step_mib"] = round(peak_rss_mib(), 1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    memory["rss_after_steps_mib"] = round(current_rss_mib() or 0.0, 1)
    return first, times


def recipe(encoder: str, optimizer: str | None = None) -> dict:
    """The encoder's optimizer and target decay, both sides' (``RECIPE_KEYS``): the paper's LARS
    for ResNets, MoCo v3's AdamW for ViTs (``optimizer`` picks the other)."""
    from byol_flax.config import base_config
    from byol_flax.configs import byol_vit_imagenet as vit_recipe
    from byol_flax.models.encoders import is_vit

    defaults = base_config()
    kind = optimizer or ("adamw" if is_vit(encoder) else "lars")
    base_lr, weight_decay = ((vit_recipe.BASE_LEARNING_RATE, vit_recipe.WEIGHT_DECAY)
                             if kind == "adamw" else
                             (defaults.optimizer.base_learning_rate,
                              defaults.optimizer.weight_decay))
    return {"optimizer": kind, "base_lr": base_lr, "weight_decay": weight_decay,
            "tau": vit_recipe.BASE_EMA if is_vit(encoder) else defaults.target.base_ema}


def build_step(encoder: str, stem: str, batch: int, *, dtype: str = "float32",
               conv: str = "auto", total_steps: int = 1000, warmup_steps: int = 10,
               image_size: int = 224, settings: dict | None = None, num_heads: int = 0,
               freeze_patch_projection: bool = False):
    """(graphdef, replicated state, jitted step, mesh) of the paper's step for this encoder.

    ``image_size``: what a ViT's position embedding is built for (a ResNet takes any);
    ``settings``: :func:`recipe`'s keys, by default the encoder's recipe; ``num_heads`` and
    ``freeze_patch_projection``: a ViT's ``model.encoder`` keys (MoCo v3 uses 12 heads and a
    frozen projection).
    """
    from flax import nnx

    from byol_flax.config import base_config
    from byol_flax.schedules import build_schedules
    from byol_flax.sharding import make_mesh, replicate
    from byol_flax.train_state import create_train_state
    from byol_flax.train_step import StepOptions, make_train_step

    settings = settings or recipe(encoder)
    config = base_config()
    config.model.encoder.name = encoder
    config.model.encoder.stem = stem
    config.model.encoder.num_heads = num_heads
    config.model.encoder.freeze_patch_projection = freeze_patch_projection
    config.data.image_size = image_size  # model.encoder.image_size follows it
    config.model.compute_dtype = dtype
    config.model.conv_implementation = conv
    config.training.batch_size = batch
    config.optimizer.kind = settings["optimizer"]
    config.optimizer.base_learning_rate = settings["base_lr"]
    config.optimizer.weight_decay = settings["weight_decay"]
    config.target.base_ema = settings["tau"]
    mesh = make_mesh()
    lr, tau = build_schedules(config, total_steps=total_steps, warmup_steps=warmup_steps)
    graphdef, state = nnx.split(create_train_state(config, lr))
    step = make_train_step(graphdef, mesh, StepOptions(lr, tau))
    return graphdef, replicate(state, mesh), step, mesh


def random_views(batch: int, image_size: int, mesh, count: int) -> list[dict]:
    """``count`` batches of two random views, sharded over ``mesh`` (seeded: equal everywhere)."""
    import numpy as np

    from byol_flax.sharding import shard_batch

    rng = np.random.default_rng(0)
    shape = (batch, image_size, image_size, 3)
    return [shard_batch({view: rng.normal(size=shape).astype(np.float32)
                         for view in ("view1", "view2")}, mesh) for _ in range(count)]


def architecture(features: int, trainable: int, vit: tuple[int, int, int] | None) -> dict:
    """What both sides report about the network they built; ``compare`` requires them equal.
    ``vit``: (heads, patch size, tokens) of a ViT (its heads do not change the parameters)."""
    return {"features": features, "trainable_parameters": trainable,
            **(dict(zip(("heads", "patch_size", "tokens"), vit)) if vit else {})}


def jax_architecture(graphdef, state) -> dict:
    """Trainable parameters (``nnx.Param``: the optimizer's) of the online network, predictor
    included; frozen arrays (a ViT's sin-cos position embedding) are not ``nnx.Param``."""
    import jax
    from flax import nnx

    from byol_flax.models.vit import VisionTransformer

    online = nnx.merge(graphdef, state).online
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(online, nnx.Param)))
    encoder = online.encoder
    vit = ((encoder.num_heads, encoder.patch_size, 1 + encoder.grid[0] * encoder.grid[1])
           if isinstance(encoder, VisionTransformer) else None)
    return architecture(encoder.num_features, trainable, vit)


def run_jax(args: argparse.Namespace) -> dict:
    from byol_flax.runtime.memory import release_free_heap
    from byol_flax.runtime.xla import configure_xla_flags

    if not args.no_xla_flags:
        configure_xla_flags()
    import jax

    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(seconds)
        if event == "/jax/core/compile/backend_compile_duration" else None)

    graphdef, state, step, mesh = build_step(args.encoder, args.stem, args.batch,
                                             dtype=args.dtype, conv=args.conv,
                                             image_size=args.image_size,
                                             settings={k: getattr(args, k) for k in RECIPE_KEYS},
                                             num_heads=args.num_heads,
                                             freeze_patch_projection=args.freeze_patch_projection)
    built = jax_architecture(graphdef, state)
    (batch,) = random_views(args.batch, args.image_size, mesh, count=1)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    flops = (lowered.cost_analysis() or {}).get("flops")
    compiles.clear()
    lowered.compile()  # fills the jitted step's cache: the timed calls do not compile
    compile_seconds = time.perf_counter() - start
    del lowered  # the training loop keeps no lowered module either
    release_free_heap()  # as the training loop does after compiling
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], batch)
        holder["loss"] = float(jax.device_get(metrics["loss"]))  # explicit; waits for the step

    memory: dict = {}
    with jax.transfer_guard("disallow"):  # the timed loop moves nothing host <-> device
        first, times = time_steps(run_step, args.steps, memory)
    return {**memory,
        "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "platform": jax.default_backend(), "versions": f"jax {jax.__version__}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "first_step_seconds": first, "compile_seconds": compile_seconds, "times": times,
        "step_gflop": flops / 1e9 if flops else None,
        "compilations": step._cache_size(), "backend_compile_seconds": sum(compiles),
        "matmul_peak_gflops": matmul_peak_gflops(), "loss": holder["loss"],
        "architecture": built,
    }


def run_torch(args: argparse.Namespace, compiled: bool) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_byol import BYOL

    torch.manual_seed(0)
    model = BYOL(encoder=args.encoder, stem=args.stem, image_size=args.image_size,
                 optimizer=args.optimizer, lr=args.base_lr * args.batch / 256,
                 weight_decay=args.weight_decay, tau=args.tau,
                 compile_mode="default" if compiled else None,
                 **({"num_heads": args.num_heads,
                     "freeze_patch_projection": args.freeze_patch_projection}
                    if args.encoder.startswith("vit") else {}))
    shape = (args.batch, 3, args.image_size, args.image_size)
    views = [torch.randn(shape).to(memory_format=model.memory_format) for _ in range(2)]
    encoder = model.online.encoder
    vit = ((encoder.blocks[0].attn.num_heads, encoder.patch_embed.patch_size[0],
            encoder.pos_embed.shape[1]) if args.encoder.startswith("vit") else None)
    built = architecture(encoder.num_features, model.trainable_parameters, vit)
    holder = {}

    def run_step():
        holder["loss"] = float(model.step(*views))

    memory: dict = {}
    first, times = time_steps(run_step, args.steps, memory)
    return {**memory, "device": f"cpu ({torch.get_num_threads()} threads)", "platform": "cpu",
            "versions": f"torch {torch.__version__}", "first_step_seconds": first,
            "times": times, "loss": holder["loss"], "architecture": built}


def summarise(impl: str, args: argparse.Namespace, raw: dict) -> dict:
    median = sorted(raw["times"])[len(raw["times"]) // 2]
    return {
        "benchmark": "train_step", "impl": impl, "encoder": args.encoder, "stem": args.stem,
        "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype,
        **{key: getattr(args, key) for key in RECIPE_KEYS},
        "num_heads": args.num_heads, "freeze_patch_projection": args.freeze_patch_projection,
        "conv": args.conv if impl == "jax" else None, "host": quiet.host_description(),
        **{k: v for k, v in raw.items() if k not in ("times", "compile_seconds")},
        "step_seconds": [round(t, 4) for t in raw["times"]],
        "step_seconds_median": round(median, 4),
        "images_per_second": round(args.batch / median, 2),
        # ours: tracing + lowering + compiling, timed ahead of the first step; torch: the first
        # step's extra time over a timed step.
        "compile_seconds": round(raw.get("compile_seconds", raw["first_step_seconds"] - median),
                                 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def worker(args: argparse.Namespace) -> dict:
    raw = run_jax(args) if args.impl == "jax" else run_torch(args, args.impl == "torch-compile")
    result = summarise(args.impl, args, raw)
    if result.get("step_gflop"):
        achieved = result["step_gflop"] / result["step_seconds_median"]
        result["achieved_gflops"] = round(achieved, 1)
        result["fraction_of_matmul_peak"] = round(achieved / result["matmul_peak_gflops"], 3)
    return result


def compare(args: argparse.Namespace) -> dict:
    """Each implementation in its own process, rotated order per round; medians and ratios."""
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLEMENTATIONS}
    loads: list[quiet.Load] = []
    passthrough = [f"--encoder={args.encoder}", f"--stem={args.stem}", f"--batch={args.batch}",
                   f"--image-size={args.image_size}", f"--steps={args.steps}",
                   f"--dtype={args.dtype}", f"--conv={args.conv}", f"--num-heads={args.num_heads}",
                   *(["--freeze-patch-projection"] if args.freeze_patch_projection else []),
                   *(f"--{key.replace('_', '-')}={getattr(args, key)}" for key in RECIPE_KEYS)]
    for round_index in range(args.rounds):
        order = IMPLEMENTATIONS[round_index % 3:] + IMPLEMENTATIONS[:round_index % 3]
        for impl in order:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                command = [sys.executable, __file__, f"--impl={impl}", f"--json-out={out.name}",
                           *passthrough]
                print(f"round {round_index + 1}/{args.rounds}: {impl}", file=sys.stderr,
                      flush=True)
                with quiet.watch(loads):  # both sides on the CPU (libtpu, when installed
                    # for the pre-flight, is not probed for a TPU)
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                                   env={"JAX_PLATFORMS": "cpu", **os.environ})
                runs[impl].append(json.loads(Path(out.name).read_text()))
            if not loads[-1].quiet:  # the comparison cannot count: stop spending time on it
                load = quiet.verdict(loads)
                return {"benchmark": "train_step_vs_pytorch", "encoder": args.encoder,
                        "stopped_after": f"{impl} in round {round_index + 1}",
                        "ratio_images_per_second": None, "load": load,
                        "ratio_withheld": load["reason"]}

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if len(values) % 2 else sum(
            values[len(values) // 2 - 1:len(values) // 2 + 1]) / 2

    built = {impl: results[0]["architecture"] for impl, results in runs.items()}
    if len({json.dumps(b, sort_keys=True) for b in built.values()}) != 1:
        raise RuntimeError(f"the two sides built different networks: {built}")
    ours = runs["jax"]
    flops, peak = ours[0]["step_gflop"], median([r["matmul_peak_gflops"] for r in ours])
    rows = {}
    for impl, results in runs.items():
        rate = median([r["images_per_second"] for r in results])
        rows[impl] = {"images_per_second": round(rate, 2),
                      "compile_seconds": round(median([r["compile_seconds"] for r in results]), 1),
                      "peak_rss_mib": round(median([r["peak_rss_mib"] for r in results]), 1),
                      **{key: round(median([r[key] for r in results]), 1) for key in (
                          "peak_rss_before_first_step_mib", "peak_rss_after_first_step_mib",
                          "rss_after_steps_mib")},
                      "spread_images_per_second": [
                          round(min(r["images_per_second"] for r in results), 2),
                          round(max(r["images_per_second"] for r in results), 2)],
                      "fraction_of_matmul_peak": round(
                          flops * rate / args.batch / peak, 3) if flops else None,
                      "per_round_images_per_second": [r["images_per_second"] for r in results],
                      "versions": results[0]["versions"]}
    best_torch = max(("torch-eager", "torch-compile"),
                     key=lambda impl: rows[impl]["images_per_second"])
    load = quiet.verdict(loads)
    withheld = load["reason"] or (f"{args.rounds} round(s): a ratio needs at least "
                                  f"{MIN_ROUNDS}" if args.rounds < MIN_ROUNDS else None)

    def ratio(key: str) -> float | None:
        return None if withheld else round(rows["jax"][key] / rows[best_torch][key], 3)

    return {
        "benchmark": "train_step_vs_pytorch", "encoder": args.encoder, "stem": args.stem,
        "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype,
        **{key: getattr(args, key) for key in RECIPE_KEYS}, "architecture": built["jax"],
        "host": ours[0]["host"], "device": ours[0]["device"], "rounds": args.rounds,
        "steps_per_round": args.steps, "step_gflop": round(flops, 1) if flops else None,
        "matmul_peak_gflops": round(peak, 1), "results": rows,
        "best_torch": best_torch, "jax_compilations": [r["compilations"] for r in ours],
        "ratio_images_per_second": ratio("images_per_second"),
        "ratio_peak_rss": ratio("peak_rss_mib"), "ratio_withheld": withheld, "load": load,
        "date": time.strftime("%Y-%m-%d"), "xla_flags": ours[0].get("xla_flags", ""),
        "targets": {"speed_at_least_1x_best_torch": rows["jax"]["images_per_second"]
                    >= rows[best_torch]["images_per_second"],
                    "rss_at_most_1.25x_torch": rows["jax"]["peak_rss_mib"]
                    <= 1.25 * rows[best_torch]["peak_rss_mib"],
                    "one_compilation": all(r["compilations"] == 1 for r in ours)},
    }


def print_table(result: dict) -> None:
    if "stopped_after" in result:
        print(f"no ratio (stopped after {result['stopped_after']}): {result['ratio_withheld']}")
        return
    rows = result.get("results") or {result["impl"]: result}
    header = (f"{'impl':<14} {'images/s':>9} {'compile s':>10} {'peak RSS MiB':>13} "
              f"{'of matmul peak':>15}")
    print(f"{result['encoder']} {result['image_size']}px batch {result['batch']} "
          f"{result['dtype']} {result['optimizer']} on {result['device']} ({result['host']})")
    print(header)
    for impl, row in rows.items():
        fraction = row.get("fraction_of_matmul_peak")
        print(f"{impl:<14} {row['images_per_second']:>9} {row['compile_seconds']:>10} "
              f"{row['peak_rss_mib']:>13} {'-' if fraction is None else f'{fraction:.1%}':>15}")
    if result.get("ratio_withheld"):
        print(f"no ratio: {result['ratio_withheld']}")
    elif "ratio_images_per_second" in result:
        print(f"ours / {result['best_torch']}: {result['ratio_images_per_second']}x images/s, "
              f"{result['ratio_peak_rss']}x peak RSS (others used at most "
              f"{result['load']['max_other_share']:.1%} of the CPUs in any round)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="resnet18",
                        help="preset: encoder, stem, image size and batch")
    parser.add_argument("--encoder")
    parser.add_argument("--stem", choices=["small", "imagenet"])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--num-heads", type=int, default=0,
                        help="a ViT's attention heads (0: the size's; MoCo v3's ViT-S: 12)")
    parser.add_argument("--freeze-patch-projection", action="store_true",
                        help="a ViT's random patch projection kept fixed (MoCo v3)")
    parser.add_argument("--dtype", default="float32", help="our compute dtype (torch: float32)")
    parser.add_argument("--conv", default="auto", help="config.model.conv_implementation")
    parser.add_argument("--optimizer", choices=("lars", "adamw"),
                        help="both sides' (default: the encoder's recipe, see above)")
    parser.add_argument("--base-lr", type=float, help="LR = this x batch / 256 (default: recipe)")
    parser.add_argument("--weight-decay", type=float, help="default: the recipe's")
    parser.add_argument("--tau", type=float, help="target EMA decay (default: the recipe's)")
    parser.add_argument("--no-xla-flags", action="store_true",
                        help="do not add byol_flax.runtime.xla's XLA:CPU flags")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default="jax")
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                        help=f"rounds (a ratio needs at least {MIN_ROUNDS})")
    parser.add_argument("--json-out", help="also write the result JSON here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for key, value in PRESETS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(getattr(args, key) is None for key in RECIPE_KEYS):  # imports byol_flax: --compare-torch
        settings = recipe(args.encoder, args.optimizer)  # passes all, so torch processes do not
        for key in RECIPE_KEYS:
            if getattr(args, key) is None:
                setattr(args, key, settings[key])
    result = compare(args) if args.compare_torch else worker(args)
    print_table(result)
    quiet.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    raise SystemExit(3 if main().get("ratio_withheld") else 0)
