"""What the train step's update costs on a CPU, and what its own monitoring of it adds: the
optimizer's update and the target's EMA alone, then with the gradient, update and parameter
norms (``byol_flax.train_step.apply_update``), then with the finiteness of the whole new state
(``state_is_finite``), each as the step runs it (state donated, in place); and the same AdamW and
EMA arithmetic over one flat array per part of the state, the layout a single flat optimizer
state would have. PyTorch's benchmark step (``benchmarks/torch_byol.py``) runs one multi-tensor
``_fused_adamw_`` and a ``lerp_``, without norms or a finiteness check.

    python benchmarks/step_monitors.py --model vit_small [--calls 15] [--json-out F]

Each variant is jitted alone over the state ``benchmarks/train_step.py`` builds, with a
stand-in gradient; the variants' calls are interleaved and each figure is the median of
``--calls`` timed calls after one untimed. Set beside the "update" row of
``benchmarks/step_profile.py`` (docs/performance.md).
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
    parser.add_argument("--model", default="vit_small",  # ViTs: the flat variant is AdamW's
                        choices=sorted(m for m in bench.PRESETS if m.startswith("vit")))
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from byol_flax.train_step import apply_update, state_is_finite

    preset = bench.PRESETS[args.model]
    graphdef, state, _, _ = bench.build_step(preset["encoder"], preset["stem"], preset["batch"],
                                             image_size=preset["image_size"])
    train_state = nnx.merge(graphdef, state)
    grads = jax.tree.map(lambda p: 1e-3 * p + 1e-4, nnx.state(train_state.online, nnx.Param))
    tau = jnp.float32(0.99)

    def as_step(update):
        def run(state, grads):
            train_state = nnx.merge(graphdef, state)
            metrics = update(train_state, grads)
            return nnx.state(train_state), metrics
        return run

    def update_alone(train_state, grads):
        train_state.optimizer.update(train_state.online, grads)
        train_state.update_target(tau)
        return {}

    def with_finiteness(train_state, grads):
        return apply_update(train_state, grads, tau) | {
            "state_is_finite": state_is_finite(train_state)}

    online_floats = sum(x.size for x in jax.tree.leaves(grads))
    target_floats = sum(x.size for x in jax.tree.leaves(nnx.state(train_state.target, nnx.Param)))
    adamw = optax.adamw(1e-3, weight_decay=0.1)

    def flat_update(flat, gradient):
        updates, moments = adamw.update(gradient, flat["moments"], flat["online"])
        online = optax.apply_updates(flat["online"], updates)
        return {"online": online, "moments": moments,
                "target": tau * flat["target"] + (1 - tau) * online[:target_floats]}, {}

    flat_gradient = jnp.full((online_floats,), 1e-4, jnp.float32)
    flat_state = {"online": jnp.full((online_floats,), 1e-2, jnp.float32),
                  "target": jnp.full((target_floats,), 1e-2, jnp.float32)}
    flat_state["moments"] = adamw.init(flat_state["online"])
    variants = {  # name: (function, its state, its gradient)
        "update": (as_step(update_alone), state, grads),
        "update_and_norms": (as_step(lambda ts, g: apply_update(ts, g, tau)),
                             jax.tree.map(jnp.copy, state), grads),
        "update_norms_and_finiteness": (as_step(with_finiteness),
                                        jax.tree.map(jnp.copy, state), grads),
        "flat_update": (flat_update, flat_state, flat_gradient),
    }
    compiled, states = {}, {}
    for name, (function, variant_state, gradient) in variants.items():
        compiled[name] = jax.jit(function, donate_argnums=0)
        states[name], _ = compiled[name](variant_state, gradient)
        jax.block_until_ready(states[name])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    loads: list[quiet.Load] = []
    with quiet.watch(loads):
        for _ in range(args.calls):
            for name, (_, _, gradient) in variants.items():
                started = time.perf_counter()
                states[name], metrics = compiled[name](states[name], gradient)
                jax.block_until_ready((states[name], metrics))
                seconds[name].append(time.perf_counter() - started)
    medians = {name: round(1e3 * statistics.median(times), 1) for name, times in seconds.items()}
    parameters = sum(x.size for x in jax.tree.leaves(states["update"])
                     if jnp.issubdtype(x.dtype, jnp.floating))
    result = {"benchmark": "step_monitors", **quiet.provenance(), "model": args.model,
              "state_floats": int(parameters), "calls": args.calls, "median_ms": medians,
              "load": quiet.verdict(loads)}
    for name, ms in medians.items():
        print(f"{name:24s} {ms:8.1f} ms")
    quiet.emit(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
