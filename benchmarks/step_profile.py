"""Where the step's time goes on the CPU, ours against PyTorch's, by kind of work.

    python benchmarks/step_profile.py --model vit_micro [--steps 3] [--top 12] [--json-out F]

Ours: ``benchmarks/train_step.py``'s step, traced with ``jax.profiler`` (a Perfetto trace) over
``--steps`` steps after a warm one; every XLA:CPU thunk's time is summed by HLO instruction and
each instruction is put in a kind by its ``op_name`` metadata in the compiled module (the
attention core, dense matmuls, LayerNorms, GELU, the update after the backward pass, and the
rest of the forward and backward: :data:`KINDS`). PyTorch: the same step
(``benchmarks/torch_byol.py``, eager: the mode whose operators the profiler names) under
``torch.profiler``, by operator, and its operators in the same kinds (:data:`TORCH_KINDS`).
Prints both tables, in milliseconds per step, and a JSON line. Figures that compare the two
count only from a quiet machine: the load is measured as ``benchmarks/quiet.py`` does.
"""

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/step_profile.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet
from benchmarks import train_step as bench

ATTENTION = "attention core (scores, softmax, value product)"
UPDATE = "update (optimizer, EMA, metrics)"
MATMULS = "matmuls (dense layers)"
# Kinds of work by an instruction's op_name (first match wins).
KINDS = (
    # The ViT names its attention core, LayerNorms and GELU (jax.named_scope in
    # byol_flax/models/vit.py); jax.nn.dot_product_attention's core is a vmap.
    (ATTENTION, re.compile(r"attention_core|BTNH|BNTS|BSNH|vmap\(")),
    (UPDATE, re.compile(r"^jit\(step\)/(?!.*(jvp|transpose))")),
    (MATMULS, re.compile(r"dot_general")),
    ("LayerNorms", re.compile(r"layer_norm")),
    ("GELU", re.compile(r"gelu")),
    ("backward, other elementwise and reductions", re.compile(r"transpose\(")),
    ("forward, other elementwise and reductions", re.compile(r"jvp\(")),
)
# PyTorch's operators in the same kinds (its forward and backward are not told apart here);
# LayerNorms and GELU go by the same names on both sides.
TORCH_KINDS = (
    (ATTENTION, re.compile(r"scaled_dot_product|softmax|bmm")),
    (UPDATE, re.compile(r"adam|lars|lerp|_foreach")),
    (MATMULS, re.compile(r"^aten::(mm|addmm|linear|matmul)$|convolution")),
    *KINDS[3:5],
)
OTHER = "other elementwise work, copies and reductions"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"")


def kind_of(op_name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(op_name):
            return kind
    return "other"


def traced_ms(run: Callable[[], Any], calls: int, instructions: Container[str]
              ) -> tuple[collections.Counter, float]:
    """``run()`` called ``calls`` times under ``jax.profiler``: the traced milliseconds per call
    of each XLA:CPU thunk named in ``instructions`` (its HLO instruction), and the wall seconds
    per call."""
    import jax

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            started = time.perf_counter()
            for _ in range(calls):
                run()
            seconds = (time.perf_counter() - started) / calls
        (trace,) = Path(directory).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_instruction: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in instructions:
            by_instruction[event["name"]] += event.get("dur", 0.0) / 1e3 / calls
    return by_instruction, seconds


def jax_profile(args: argparse.Namespace) -> dict[str, Any]:
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax

    _, state, step, mesh = bench.build_step(args.encoder, args.stem, args.batch,
                                            image_size=args.image_size)
    (batch,) = bench.random_views(args.batch, args.image_size, mesh, count=1)
    compiled = step.lower(state, batch).compile()
    op_names = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match,
                                                    compiled.as_text().splitlines()) if m}
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)

    def run_step():
        nonlocal state, metrics
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)

    by_instruction, seconds = traced_ms(run_step, args.steps, op_names)
    by_kind: collections.Counter = collections.Counter()
    for name, ms in by_instruction.items():
        by_kind[kind_of(op_names[name])] += ms
    return {"step_ms": round(seconds * 1e3, 1),
            "kinds_ms": {k: round(v, 1) for k, v in by_kind.most_common()},
            "top_ms": [(name, round(ms, 1), op_names[name][:90])
                       for name, ms in by_instruction.most_common(args.top)]}


def torch_profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_byol import BYOL

    settings = bench.recipe(args.encoder)
    torch.manual_seed(0)
    model = BYOL(encoder=args.encoder, stem=args.stem, image_size=args.image_size,
                 optimizer=settings["optimizer"], lr=settings["base_lr"] * args.batch / 256,
                 weight_decay=settings["weight_decay"], tau=settings["tau"], compile_mode=None)
    shape = (args.batch, 3, args.image_size, args.image_size)
    views = [torch.randn(shape).to(memory_format=model.memory_format) for _ in range(2)]
    model.step(*views)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(args.steps):
            model.step(*views)
        seconds = (time.perf_counter() - started) / args.steps
    rows = sorted(profiler.key_averages(), key=lambda row: -row.self_cpu_time_total)
    by_kind: collections.Counter = collections.Counter()
    for row in rows:
        kind = next((kind for kind, pattern in TORCH_KINDS if pattern.search(row.key)), OTHER)
        by_kind[kind] += row.self_cpu_time_total / 1e3 / args.steps
    return {"step_ms": round(seconds * 1e3, 1),
            "kinds_ms": {k: round(v, 1) for k, v in by_kind.most_common()},
            "top_ms": [(row.key, round(row.self_cpu_time_total / 1e3 / args.steps, 1))
                       for row in rows[:args.top]]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(bench.PRESETS), default="vit_micro")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    for key, value in bench.PRESETS[args.model].items():
        setattr(args, key, value)
    loads: list[quiet.Load] = []
    with quiet.watch(loads):
        ours = jax_profile(args)
        theirs = None if args.no_torch else torch_profile(args)
    print(f"ours: {ours['step_ms']} ms per step (traced)")
    for kind, ms in ours["kinds_ms"].items():
        print(f"  {kind:<40} {ms:>8.1f} ms  {ms / ours['step_ms']:>5.0%}")
    for name, ms, op_name in ours["top_ms"]:
        print(f"    {name:<28} {ms:>8.1f} ms  {op_name}")
    if theirs:
        print(f"torch eager: {theirs['step_ms']} ms per step (profiled)")
        for name, ms in theirs["top_ms"]:
            print(f"    {name:<44} {ms:>8.1f} ms")
    import jax

    versions = f"jax {jax.__version__}"
    if theirs:
        import torch

        versions += f", torch {torch.__version__}"
    result = {"benchmark": "step_profile", "model": args.model, "ours": ours, "torch": theirs,
              "load": quiet.verdict(loads), "host": quiet.host_description(),
              "date": time.strftime("%Y-%m-%d"), "versions": versions, "steps": args.steps}
    if not result["load"]["quiet"]:
        print(f"not a quiet machine: {result['load']['reason']}")
    print(json.dumps(result))
    if args.json_out:
        from byol_flax.storage import files

        files.write_text(args.json_out, json.dumps(result), what="profile result")
    return result


if __name__ == "__main__":
    main()
