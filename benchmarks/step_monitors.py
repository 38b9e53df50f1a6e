"""What the train step's own monitoring of the update costs, alone: the finiteness of the whole
state, and with it the gradient, update and parameter norms, each a pass over arrays the size
of the model that PyTorch's benchmark step (``benchmarks/torch_byol.py``) does not make.

    python benchmarks/step_monitors.py --model vit_small [--calls 15] [--json-out F]

Each is jitted alone over the state ``benchmarks/train_step.py`` builds (the update norm over a
stand-in update); the median of ``--calls`` timed calls after one untimed. Set beside the
"update" row of ``benchmarks/step_profile.py`` (docs/performance.md).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/step_monitors.py`: benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet
from benchmarks import train_step as bench


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(bench.PRESETS), default="vit_small")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from byol_flax.train_step import state_is_finite

    preset = bench.PRESETS[args.model]
    graphdef, state, _, _ = bench.build_step(preset["encoder"], preset["stem"], preset["batch"],
                                             image_size=preset["image_size"])

    def finite(state):
        return state_is_finite(nnx.merge(graphdef, state))

    def finite_and_norms(state):
        train_state = nnx.merge(graphdef, state)
        params = jax.tree.leaves(nnx.state(train_state.online, nnx.Param))
        stand_in_update = [p * 1e-4 for p in params]
        return (state_is_finite(train_state), optax.tree.norm(params),
                optax.tree.norm(stand_in_update), optax.tree.norm(params))

    loads: list[quiet.Load] = []
    medians = {}
    with quiet.watch(loads):
        for name, function in (("finiteness", finite), ("finiteness_and_norms", finite_and_norms)):
            compiled = jax.jit(function)
            jax.block_until_ready(compiled(state))
            seconds = []
            for _ in range(args.calls):
                started = time.perf_counter()
                jax.block_until_ready(compiled(state))
                seconds.append(time.perf_counter() - started)
            medians[name] = round(1e3 * statistics.median(seconds), 1)
    parameters = sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype,
                                                                             jnp.floating))
    result = {"benchmark": "step_monitors", **quiet.provenance(), "model": args.model,
              "state_floats": int(parameters), "calls": args.calls, "median_ms": medians,
              "load": quiet.verdict(loads)}
    for name, ms in medians.items():
        print(f"{name:24s} {ms:8.1f} ms")
    quiet.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
