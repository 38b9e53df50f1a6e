"""The step's operations one at a time, XLA:CPU against PyTorch on the same inputs: what each
side's kernels cost for the same arithmetic, apart from everything else in the step.

    python benchmarks/ops.py --model vit_micro|vit_small|resnet18 [--rounds 5] [--calls 5]
                             [--json-out F]

A ViT's operations run forward and backward (the gradient of ``sum(output * cotangent)`` with
respect to every input) at the shapes of the step's online forward (both views, so 2 x batch
sequences), on arrays both sides share bit for bit:

  ``layer_norm``: the ViT's ``nnx.LayerNorm`` against ``torch.nn.functional.layer_norm``;
  ``gelu``: ``byol_flax.models.vit.gelu`` (exact, erf) on the MLP's hidden activation against
  ``torch.nn.functional.gelu``;
  ``attention_core``: ``byol_flax.models.vit.attention_core`` against
  ``torch.nn.functional.scaled_dot_product_attention`` (timm's fused attention);
  ``dense``: the MLP's first layer, ``x @ W + b``, against ``torch.nn.functional.linear``.

A ResNet's are its 3x3 convolutions at the step's batch (one view), each split into its three
parts, the forward, the input gradient and the weight gradient: ours
``byol_flax.models.conv.conv_auto`` (what the ResNet runs on a CPU) and its VJP, PyTorch's
``aten::convolution`` and ``aten::convolution_backward`` on channels-last tensors (what its
eager step runs); their GFLOP/s beside the times.

Before timing, both sides' results are compared (a mismatch stops the benchmark). Rounds are
interleaved (each operation: ours, then PyTorch's); each figure is the median over rounds of the
median of ``--calls`` calls, and the ratio is PyTorch's time over ours (above 1: ours faster).
The load is watched as ``benchmarks/quiet.py`` does and ratios of a loaded run are withheld.
Afterwards our side of each operation is traced (``jax.profiler``) and its time split between
XLA:CPU's matrix products (instructions whose computation holds a ``dot``) and the rest
(elementwise loops and reductions); XLA:CPU's convolutions run on Eigen's own threads, which
the trace does not see.
"""

import argparse
import dataclasses
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/ops.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet, step_profile
from benchmarks import train_step as bench

VIT_OPERATIONS = ("layer_norm", "gelu", "attention_core", "dense")
# ResNet-18's 3x3 convolutions at 32 px (the small stem): (map side, in, out channels, stride).
RESNET18_CONVOLUTIONS = ((32, 64, 64, 1), (32, 64, 128, 2), (16, 128, 128, 1),
                         (8, 256, 256, 1), (4, 512, 512, 1))
CONVOLUTION_PARTS = ("forward", "input gradient", "weight gradient")
MODELS = ("vit_micro", "vit_small", "resnet18")
# PyTorch's OpenMP workers spin for a while after a parallel region (KMP_BLOCKTIME / GOMP's
# spin): each side waits this long before its calls so the other's threads are asleep.
SETTLE_SECONDS = 0.5


@dataclasses.dataclass
class Operation:
    """One operation on both sides: each a function of its own inputs; ``theirs_as_ours`` turns
    PyTorch's results into ours' layout for the comparison; ``gflop`` when counted."""

    ours: Callable
    ours_inputs: list
    theirs: Callable
    theirs_inputs: list
    theirs_as_ours: Callable[[Any], list]
    gflop: float | None = None


def _normal(rng, *shape):
    import numpy as np

    return rng.standard_normal(shape, dtype=np.float32)


def vit_operations(model: str, seed: int = 0) -> tuple[dict[str, Operation], dict[str, Any]]:
    """The ViT block's operations at the preset's shapes, and those shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flax import nnx

    from byol_flax.models import vit
    from byol_flax.models.encoders import build_encoder

    preset = bench.PRESETS[model]
    encoder = build_encoder(preset["encoder"], stem=preset["stem"],
                            image_size=preset["image_size"], rngs=nnx.Rngs(0))
    block = encoder.blocks[0]
    b, t, d = 2 * preset["batch"], 1 + encoder.grid[0] * encoder.grid[1], encoder.num_features
    heads, mlp = encoder.num_heads, block.fc1.kernel.shape[1]
    rng = np.random.default_rng(seed)

    def layer_norm(x, scale, bias):  # the module's own computation, its parameters as inputs
        norm = nnx.clone(block.norm1)
        norm.scale[...], norm.bias[...] = scale, bias
        return norm(x)

    epsilon = block.norm1.epsilon
    definitions = {  # name: (ours, PyTorch's, inputs then the output's cotangent)
        "layer_norm": (layer_norm, lambda x, w, c: F.layer_norm(x, (d,), w, c, eps=epsilon),
                       [_normal(rng, b, t, d), 1 + 0.1 * _normal(rng, d), 0.1 * _normal(rng, d),
                        _normal(rng, b, t, d)]),
        "gelu": (vit.gelu, F.gelu, [_normal(rng, b, t, mlp), _normal(rng, b, t, mlp)]),
        "attention_core": (vit.attention_core, F.scaled_dot_product_attention,
                           [_normal(rng, b, heads, t, d // heads) for _ in range(4)]),
        "dense": (lambda x, kernel, bias: x @ kernel + bias,
                  lambda x, w, c: F.linear(x, w.t(), c),
                  [_normal(rng, b, t, d), _normal(rng, d, mlp) / d ** 0.5,
                   0.1 * _normal(rng, mlp), _normal(rng, b, t, mlp)]),
    }
    operations = {}
    for name, (forward, torch_forward, arrays) in definitions.items():
        count = len(arrays) - 1

        def loss(*args, forward=forward):
            *arguments, cotangent = args
            return jnp.sum(forward(*arguments) * cotangent)

        def run(*args, torch_forward=torch_forward):
            *arguments, cotangent = args
            leaves = [a.detach().requires_grad_(True) for a in arguments]
            torch_forward(*leaves).backward(cotangent)
            return [leaf.grad for leaf in leaves]

        operations[name] = Operation(
            jax.jit(jax.grad(loss, argnums=tuple(range(count)))),
            [jnp.asarray(a) for a in arrays], run, [torch.from_numpy(a) for a in arrays],
            lambda grads: [g.numpy() for g in grads])
    return operations, {"sequences": b, "tokens": t, "width": d, "heads": heads,
                        "mlp_width": mlp}


def conv_operations(model: str, seed: int = 0) -> tuple[dict[str, Operation], dict[str, Any]]:
    """ResNet-18's 3x3 convolutions at the preset's batch, each as its three parts."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from byol_flax.models.conv import conv_auto

    batch = bench.PRESETS[model]["batch"]
    rng = np.random.default_rng(seed)
    operations = {}
    for side, cin, cout, stride in RESNET18_CONVOLUTIONS:
        out_side = side // stride
        x = _normal(rng, batch, side, side, cin)
        w = _normal(rng, 3, 3, cin, cout) / (9 * cin) ** 0.5
        g = _normal(rng, batch, out_side, out_side, cout)
        gflop = 2 * batch * out_side * out_side * cout * cin * 9 / 1e9

        def forward(x, w, stride=stride):
            return conv_auto(x, w, (stride, stride), ((1, 1), (1, 1)),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def input_gradient(x, w, g, forward=forward):
            return jax.vjp(lambda x: forward(x, w), x)[1](g)[0]

        def weight_gradient(x, w, g, forward=forward):
            return jax.vjp(lambda w: forward(x, w), w)[1](g)[0]

        # PyTorch's layouts: NCHW shapes over channels-last memory, OIHW weights.
        tx = torch.from_numpy(x).permute(0, 3, 1, 2)
        tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        tg = torch.from_numpy(g).permute(0, 3, 1, 2)
        common = dict(stride=[stride] * 2, padding=[1, 1], dilation=[1, 1], transposed=False,
                      output_padding=[0, 0], groups=1)

        def torch_forward(x, w, common=common):
            return torch.ops.aten.convolution(x, w, None, **common)

        def torch_backward(mask):
            def run(x, w, g, common=common):
                return torch.ops.aten.convolution_backward(
                    g, x, w, None, common["stride"], common["padding"], common["dilation"],
                    False, [0, 0], 1, mask)
            return run

        def nhwc(t):
            return t.permute(0, 2, 3, 1).numpy()

        layer = f"{side}x{side} {cin}->{cout}" + (f" stride {stride}" if stride > 1 else "")
        parts = {
            "forward": (jax.jit(forward), [x, w], torch_forward, [tx, tw],
                        lambda out: [nhwc(out)]),
            "input gradient": (jax.jit(input_gradient), [x, w, g], torch_backward(
                [True, False, False]), [tx, tw, tg], lambda out: [nhwc(out[0])]),
            "weight gradient": (jax.jit(weight_gradient), [x, w, g], torch_backward(
                [False, True, False]), [tx, tw, tg],
                lambda out: [out[1].permute(2, 3, 1, 0).numpy()]),
        }
        for part, (ours, ours_in, theirs, theirs_in, as_ours) in parts.items():
            operations[f"{layer}: {part}"] = Operation(
                ours, [jnp.asarray(a) for a in ours_in], theirs, theirs_in, as_ours, gflop)
    return operations, {"batch": batch, "layers": len(RESNET18_CONVOLUTIONS)}


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
    by_instruction, _ = step_profile.traced_ms(
        lambda: jax.block_until_ready(function(*arguments)), calls, names)
    split = {"matmuls": 0.0, "other": 0.0}
    for name, ms in by_instruction.items():
        split["matmuls" if name in matmuls else "other"] += ms
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
    parser.add_argument("--model", choices=MODELS, default="vit_micro")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per side per round")
    parser.add_argument("--operations", help="a ViT's operations to run, comma-separated "
                                             f"(default: all of {', '.join(VIT_OPERATIONS)})")
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    if args.rounds < bench.MIN_ROUNDS:
        parser.error(f"--rounds {args.rounds}: at least {bench.MIN_ROUNDS} interleaved rounds")
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax
    import numpy as np
    import torch

    build = conv_operations if args.model.startswith("resnet") else vit_operations
    operations, dims = build(args.model)
    if args.operations:
        chosen = args.operations.split(",")
        unknown = sorted(set(chosen) - set(operations))
        if unknown:
            parser.error(f"--operations: unknown {', '.join(unknown)}; {args.model}'s are "
                         f"{', '.join(operations)}")
        operations = {name: operations[name] for name in chosen}
    for name, operation in operations.items():  # both sides compute the same thing
        mine = jax.tree.leaves(operation.ours(*operation.ours_inputs))
        theirs = operation.theirs_as_ours(operation.theirs(*operation.theirs_inputs))
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=2e-3, atol=2e-3, err_msg=name)

    samples: dict[str, dict[str, list[float]]] = {o: {"ours": [], "torch": []} for o in operations}
    loads: list[quiet.Load] = []
    for _ in range(args.rounds):
        with quiet.watch(loads):
            for name, operation in operations.items():
                samples[name]["ours"].append(timed(operation.ours, operation.ours_inputs,
                                                   args.calls, jax.block_until_ready))
                samples[name]["torch"].append(timed(operation.theirs, operation.theirs_inputs,
                                                    args.calls, lambda out: out))
    load = quiet.verdict(loads)
    rows = {}
    for name, sides in samples.items():
        operation = operations[name]
        ours_ms, torch_ms = (statistics.median(sides[side]) for side in ("ours", "torch"))
        rows[name] = {
            "ours_ms": round(ours_ms, 2), "torch_ms": round(torch_ms, 2),
            "ours_spread_ms": [round(min(sides["ours"]), 2), round(max(sides["ours"]), 2)],
            "torch_spread_ms": [round(min(sides["torch"]), 2), round(max(sides["torch"]), 2)],
            "torch_over_ours": round(torch_ms / ours_ms, 3) if load["quiet"] else None,
            "ours_traced_ms": traced_split(operation.ours, operation.ours_inputs, args.calls)}
        if operation.gflop is not None:
            rows[name] |= {"gflop": round(operation.gflop, 3),
                           "ours_gflops": round(operation.gflop / ours_ms * 1e3, 1),
                           "torch_gflops": round(operation.gflop / torch_ms * 1e3, 1)}
    result = {"benchmark": "ops", **quiet.provenance(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "model": args.model, "shapes": dims,
              "rounds": args.rounds, "calls": args.calls, "load": load, "operations": rows}
    for name, row in rows.items():
        print(f"{name:36s} ours {row['ours_ms']:8.2f} ms  torch {row['torch_ms']:8.2f} ms  "
              f"torch/ours {row['torch_over_ours']}  ours traced {row['ours_traced_ms']}")
    if not load["quiet"]:
        print(f"ratios withheld: {load['reason']}")
    quiet.emit(result, args.json_out)
    return result

if __name__ == "__main__":
    main()
