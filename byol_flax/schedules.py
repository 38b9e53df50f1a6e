"""Learning-rate and target-decay schedules: pure functions of the optimizer step (Appendix A)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array | int], jax.Array]


def learning_rate_schedule(*, base_learning_rate: float, batch_size: int, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
    """LR = base_lr x batch/256, linear warm-up from 0, then cosine decay to 0 without restarts."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, total_steps={total_steps})")
    peak = base_learning_rate * batch_size / 256
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=0.0)


def target_ema_schedule(*, base_ema: float, total_steps: int, kind: str = "cosine") -> Schedule:
    """tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, rising from tau_base to 1 (Section 3.2).

    ``kind="constant"`` keeps tau_k = tau_base, which Appendix J.1 needs for tau = 0.
    """
    if kind == "constant":
        return lambda step: jnp.full((), base_ema, jnp.float32)
    if kind != "cosine":
        raise ValueError(f"target.schedule must be 'cosine' or 'constant', got {kind!r}")

    def schedule(step: jax.Array | int) -> jax.Array:
        progress = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
        return 1.0 - (1.0 - base_ema) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

    return schedule


def build_schedules(config, *, total_steps: int,
                    warmup_steps: int) -> tuple[optax.Schedule, Schedule]:
    """The learning-rate and tau schedules of a config (``optimizer``, ``training``, ``target``)."""
    learning_rate = learning_rate_schedule(
        base_learning_rate=config.optimizer.base_learning_rate,
        batch_size=config.training.batch_size, warmup_steps=warmup_steps, total_steps=total_steps)
    target_ema = target_ema_schedule(base_ema=config.target.base_ema, total_steps=total_steps,
                                     kind=config.target.schedule)
    return learning_rate, target_ema
