"""The ViT step with earlier forms of its attention and GELU against the current ones, timed in
one process with the variants' steps interleaved, so that drift on a shared machine hits all
of them alike (a step of this machine varies by 10-15% from minute to minute).

    python benchmarks/vit_forms.py --model vit_micro [--steps 12] [--json-out F]

Variants (each the same function: tests/test_vit.py and tests/test_timm_vit.py check the
current one against timm's and JAX's):
  ``fused_split_sdpa_erfc`` (the form before): the fused ``qkv`` output split by einops,
  ``jax.nn.dot_product_attention`` (the softmax normalising the scores), and
  ``jax.nn.gelu(approximate=False)`` (erfc);
  ``one_einsum``: q, k, v from one einsum over the fused kernel, then split on the leading axis;
  ``softmax_on_scores``: the current projections, the softmax normalising the scores;
  ``current``: byol_flax/models/vit.py as it is.
Prints each variant's median step and its speedup over the first (the median of per-round
ratios), and the load (``benchmarks/quiet.py``).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/vit_forms.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet
from benchmarks import train_step as bench


def _projections(attention, x):
    """q, k, v in (batch, heads, tokens, head width) from the thirds of the fused kernel."""
    import jax.numpy as jnp

    width, heads = x.shape[-1], attention.num_heads
    kernel = attention.qkv.kernel[...].reshape(width, 3, heads, width // heads)
    bias = attention.qkv.bias[...].reshape(3, heads, 1, width // heads)
    return [jnp.einsum("btd,dnh->bnth", x, kernel[:, i]) + bias[i] for i in range(3)]


def _output(attention, attended):
    import jax.numpy as jnp

    heads, head_width = attended.shape[1], attended.shape[-1]
    kernel = attention.proj.kernel[...].reshape(heads, head_width, heads * head_width)
    return jnp.einsum("bnth,nhd->btd", attended, kernel) + attention.proj.bias[...]


def fused_split_sdpa(attention, x):
    import einops
    import jax

    q, k, v = einops.rearrange(attention.qkv(x), "b t (three n h) -> three b t n h", three=3,
                               n=attention.num_heads)
    return attention.proj(einops.rearrange(jax.nn.dot_product_attention(q, k, v),
                                           "b t n h -> b t (n h)"))


def one_einsum(attention, x):
    import jax
    import jax.numpy as jnp

    width, heads = x.shape[-1], attention.num_heads
    kernel = attention.qkv.kernel[...].reshape(width, 3, heads, width // heads)
    q, k, v = (jnp.einsum("btd,dsnh->sbnth", x, kernel)
               + attention.qkv.bias[...].reshape(3, 1, heads, 1, width // heads))
    scores = jnp.einsum("bnqh,bnkh->bnqk", q * (width // heads) ** -0.5, k)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    return _output(attention, jnp.einsum("bnqk,bnkh->bnqh", weights, v)
                   / weights.sum(-1, keepdims=True))


def softmax_on_scores(attention, x):
    import jax
    import jax.numpy as jnp

    q, k, v = _projections(attention, x)
    scores = jnp.einsum("bnqh,bnkh->bnqk", q * q.shape[-1] ** -0.5, k)
    return _output(attention, jnp.einsum("bnqk,bnkh->bnqh", jax.nn.softmax(scores, -1), v))


def erfc_gelu_block(block, x):
    import jax

    x = x + block.attn(block.norm1(x))
    return x + block.fc2(jax.nn.gelu(block.fc1(block.norm2(x)), approximate=False))


# name -> (Attention.__call__, Block.__call__); None keeps the current one.
VARIANTS = {"fused_split_sdpa_erfc": (fused_split_sdpa, erfc_gelu_block),
            "one_einsum": (one_einsum, None),
            "softmax_on_scores": (softmax_on_scores, None),
            "current": (None, None)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit_micro", "vit_small"], default="vit_micro")
    parser.add_argument("--steps", type=int, default=12, help="timed rounds (a step of each)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown form(s) {', '.join(unknown)}; the forms are "
                     f"{', '.join(VARIANTS)}")
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax

    from byol_flax.models import vit

    preset = bench.PRESETS[args.model]
    current = (vit.Attention.__call__, vit.Block.__call__)
    runs = {}
    for name in args.variants.split(","):
        attention, block = VARIANTS[name]
        vit.Attention.__call__ = attention or current[0]
        vit.Block.__call__ = block or current[1]
        try:  # traced now: the patch is in this variant's compiled step only
            _, state, step, mesh = bench.build_step(preset["encoder"], preset["stem"],
                                                    preset["batch"],
                                                    image_size=preset["image_size"])
            (batch,) = bench.random_views(preset["batch"], preset["image_size"], mesh, 1)
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        finally:
            vit.Attention.__call__, vit.Block.__call__ = current
        runs[name] = {"step": step, "state": state, "batch": batch, "seconds": []}
    loads: list[quiet.Load] = []
    with quiet.watch(loads):
        for _ in range(args.steps):
            for run in runs.values():
                started = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batch"])
                float(metrics["loss"])
                run["seconds"].append(time.perf_counter() - started)
    first = next(iter(runs.values()))["seconds"]
    result = {"benchmark": "vit_forms", **quiet.provenance(), "model": args.model,
              "batch": preset["batch"], "image_size": preset["image_size"],
              "steps": args.steps, "load": quiet.verdict(loads), "variants": {
                  name: {"median_step_ms": round(1e3 * statistics.median(run["seconds"]), 1),
                         "speedup_over_first": round(statistics.median(
                             a / b for a, b in zip(first, run["seconds"])), 3)}
                  for name, run in runs.items()}}
    for name, row in result["variants"].items():
        print(f"{name:24s} {row['median_step_ms']:8.1f} ms  {row['speedup_over_first']:.3f}x")
    if not result["load"]["quiet"]:
        print(f"not quiet: {result['load']['reason']}")
    quiet.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
