"""The ViT step's operations one at a time, XLA:CPU against PyTorch on the same inputs: what
each side's kernels cost for the same arithmetic, apart from everything else in the step.

    python benchmarks/vit_ops.py --model vit_micro [--rounds 5] [--calls 5] [--json-out F]

Each operation runs forward and backward (the gradient of ``sum(output * cotangent)`` with
respect to every input) at the shapes of the step's online forward (both views, so 2 x batch
sequences), on arrays both sides share bit for bit:

  ``layer_norm``: the ViT's ``nnx.LayerNorm`` against ``torch.nn.functional.layer_norm``;
  ``gelu``: ``byol_flax.models.vit.gelu`` (exact, erf) on the MLP's hidden activation against
  ``torch.nn.functional.gelu``;
  ``attention_core``: ``byol_flax.models.vit.attention_core`` against
  ``torch.nn.functional.scaled_dot_product_attention`` (timm's fused attention);
  ``dense``: the MLP's first layer, ``x @ W + b``, against ``torch.nn.functional.linear``.

Rounds are interleaved (each operation: ours, then PyTorch's); each figure is the median over
rounds of the median of ``--calls`` calls, and the ratio is PyTorch's time over ours (above 1:
ours faster). The load is watched as ``benchmarks/quiet.py`` does and ratios of a loaded run are
withheld. Afterwards our side of each operation is traced (``jax.profiler``) and its time split
between XLA:CPU's matrix products (instructions whose computation holds a ``dot``) and the rest
(elementwise loops and reductions), which says whose kernel the time is in.
"""

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/vit_ops.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet
from benchmarks import train_step as bench

OPERATIONS = ("layer_norm", "gelu", "attention_core", "dense")
# PyTorch's OpenMP workers spin for a while after a parallel region (KMP_BLOCKTIME / GOMP's
# spin): each side waits this long before its calls so the other's threads are asleep.
SETTLE_SECONDS = 0.5


def shapes(model: str) -> dict[str, Any]:
    """Batch (both views), tokens, width, heads and MLP width of the preset's ViT."""
    from flax import nnx

    from byol_flax.models.encoders import build_encoder

    preset = bench.PRESETS[model]
    encoder = build_encoder(preset["encoder"], stem=preset["stem"],
                            image_size=preset["image_size"], rngs=nnx.Rngs(0))
    block = encoder.blocks[0]
    return {"sequences": 2 * preset["batch"], "tokens": 1 + encoder.grid[0] * encoder.grid[1],
            "width": encoder.num_features, "heads": encoder.num_heads,
            "mlp_width": block.fc1.kernel.shape[1], "norm": block.norm1}


def inputs(operation: str, dims: dict[str, Any], seed: int = 0) -> list:
    """The operation's inputs and the output's cotangent (last), as float32 NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, t, d = dims["sequences"], dims["tokens"], dims["width"]
    heads, mlp = dims["heads"], dims["mlp_width"]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    if operation == "layer_norm":
        return [normal(b, t, d), 1 + 0.1 * normal(d), 0.1 * normal(d), normal(b, t, d)]
    if operation == "gelu":
        return [normal(b, t, mlp), normal(b, t, mlp)]
    if operation == "attention_core":
        qkv = [normal(b, heads, t, d // heads) for _ in range(3)]
        return [*qkv, normal(b, heads, t, d // heads)]
    if operation == "dense":
        return [normal(b, t, d), normal(d, mlp) / d ** 0.5, 0.1 * normal(mlp), normal(b, t, mlp)]
    raise ValueError(f"unknown operation {operation!r}; the operations are {list(OPERATIONS)}")


def jax_function(operation: str, dims: dict[str, Any]):
    """Ours: jitted forward and backward of the project's own code for ``operation``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from byol_flax.models import vit

    def layer_norm(x, scale, bias):  # the module's own computation, its parameters as inputs
        norm = nnx.clone(dims["norm"])
        norm.scale.value, norm.bias.value = scale, bias
        return norm(x)

    forward = {"layer_norm": layer_norm, "gelu": vit.gelu, "attention_core": vit.attention_core,
               "dense": lambda x, kernel, bias: x @ kernel + bias}[operation]

    def loss(*args):
        *arguments, cotangent = args
        return jnp.sum(forward(*arguments) * cotangent)

    count = len(inputs(operation, {**dims, "sequences": 1, "tokens": 2})) - 1
    return jax.jit(jax.grad(loss, argnums=tuple(range(count))))


def torch_function(operation: str, dims: dict[str, Any]):
    """PyTorch's: forward and backward of the operator timm's ViT calls for ``operation``."""
    import torch.nn.functional as F

    epsilon = dims["norm"].epsilon
    forward = {
        "layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps=epsilon),
        "gelu": F.gelu,
        "attention_core": F.scaled_dot_product_attention,
        "dense": lambda x, w, b: F.linear(x, w.t(), b),
    }[operation]

    def run(*args):
        *arguments, cotangent = args
        leaves = [a.detach().requires_grad_(True) for a in arguments]
        output = forward(*leaves)
        output.backward(cotangent)
        return [leaf.grad for leaf in leaves]

    return run


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def matmul_instructions(hlo_text: str) -> set[str]:
    """Names of the compiled module's instructions that compute a matrix product: ``dot``s and
    fusions (YNNPACK's included) whose called computation holds one."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    calls = {}
    for lines in bodies.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match:
                called = _CALLS.search(line)
                calls[match.group(1)] = (match.group(2), called and called.group(1))

    def holds_dot(computation: str | None) -> bool:
        return any(" dot(" in line for line in bodies.get(computation or "", ()))

    return {name for name, (opcode, called) in calls.items()
            if opcode == "dot" or (opcode == "fusion" and holds_dot(called))}


def traced_split(function, arguments, calls: int) -> dict[str, float]:
    """Traced milliseconds per call of a jitted ``function``: in matrix products, elsewhere."""
    import jax

    hlo = function.lower(*arguments).compile().as_text()
    matmuls = matmul_instructions(hlo)
    names = {m.group(1) for m in map(_INSTRUCTION.match, hlo.splitlines()) if m}
    jax.block_until_ready(function(*arguments))
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(calls):
                jax.block_until_ready(function(*arguments))
        (trace,) = Path(directory).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))
    split: collections.Counter = collections.Counter({"matmuls": 0.0, "other": 0.0})
    for event in events["traceEvents"] if isinstance(events, dict) else events:
        if event.get("ph") == "X" and event.get("name") in names:
            kind = "matmuls" if event["name"] in matmuls else "other"
            split[kind] += event.get("dur", 0.0) / 1e3 / calls
    return {kind: round(ms, 2) for kind, ms in split.items()}


def timed(function, arguments, calls: int, block) -> float:
    """Median milliseconds of ``calls`` calls after ``SETTLE_SECONDS``."""
    time.sleep(SETTLE_SECONDS)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        block(function(*arguments))
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit_micro", "vit_small"], default="vit_micro")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per side per round")
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    operations = args.operations.split(",")
    unknown = sorted(set(operations) - set(OPERATIONS))
    if unknown:
        parser.error(f"--operations: unknown {', '.join(unknown)}; the operations are "
                     f"{', '.join(OPERATIONS)}")
    if args.rounds < bench.MIN_ROUNDS:
        parser.error(f"--rounds {args.rounds}: at least {bench.MIN_ROUNDS} interleaved rounds")
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax
    import numpy as np
    import torch

    dims = shapes(args.model)
    prepared = {}
    for operation in operations:
        arrays = inputs(operation, dims)
        ours, theirs = jax_function(operation, dims), torch_function(operation, dims)
        ours_in = [jax.numpy.asarray(a) for a in arrays]
        theirs_in = [torch.from_numpy(a) for a in arrays]
        # The same gradients up to float rounding: both sides compute the same thing.
        for mine, other in zip(ours(*ours_in), theirs(*theirs_in), strict=True):
            np.testing.assert_allclose(np.asarray(mine), other.numpy(), rtol=2e-3, atol=2e-3)
        prepared[operation] = (ours, ours_in, theirs, theirs_in)

    samples: dict[str, dict[str, list[float]]] = {o: {"ours": [], "torch": []} for o in operations}
    loads: list[quiet.Load] = []
    for _ in range(args.rounds):
        with quiet.watch(loads):
            for operation, (ours, ours_in, theirs, theirs_in) in prepared.items():
                samples[operation]["ours"].append(
                    timed(ours, ours_in, args.calls, jax.block_until_ready))
                samples[operation]["torch"].append(
                    timed(theirs, theirs_in, args.calls, lambda out: out))
    load = quiet.verdict(loads)
    traced = {operation: traced_split(ours, ours_in, args.calls)
              for operation, (ours, ours_in, _, _) in prepared.items()}
    rows = {}
    for operation, sides in samples.items():
        ours_ms, torch_ms = (statistics.median(sides[side]) for side in ("ours", "torch"))
        rows[operation] = {
            "ours_ms": round(ours_ms, 2), "torch_ms": round(torch_ms, 2),
            "ours_spread_ms": [round(min(sides["ours"]), 2), round(max(sides["ours"]), 2)],
            "torch_spread_ms": [round(min(sides["torch"]), 2), round(max(sides["torch"]), 2)],
            "torch_over_ours": round(torch_ms / ours_ms, 3) if load["quiet"] else None,
            "ours_traced_ms": traced[operation]}
    result = {"benchmark": "vit_ops", **quiet.provenance(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "model": args.model,
              "shapes": {k: v for k, v in dims.items() if k != "norm"},
              "rounds": args.rounds, "calls": args.calls, "load": load, "operations": rows}
    for operation, row in rows.items():
        print(f"{operation:15s} ours {row['ours_ms']:8.2f} ms  torch {row['torch_ms']:8.2f} ms  "
              f"torch/ours {row['torch_over_ours']}  ours traced {row['ours_traced_ms']}")
    if not load["quiet"]:
        print(f"ratios withheld: {load['reason']}")
    quiet.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
