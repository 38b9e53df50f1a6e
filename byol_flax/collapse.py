"""Collapse monitoring: the failure BYOL's predictor and slow-moving target exist to prevent.

Computed inside the train step on every batch (:func:`collapse_metrics`), warned about by the
training loop at logging steps (:func:`warn_on_collapse`), and turned into a verdict by the
study summaries (:func:`collapse_verdict`), all against the thresholds defined here once.
"""

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from byol_flax.losses import l2_normalize

# Complete collapse: the batch std of l2-normalised vectors below this fraction of 1/sqrt(d)
# (the value of vectors spread uniformly on the sphere).
COMPLETE_COLLAPSE_STD_RATIO = 0.2
# Dimensional collapse: the projections' effective rank below this fraction of d.
DIMENSIONAL_COLLAPSE_RANK_FRACTION = 0.1
# The scalars the studies and reports show.
MONITORS = ("collapse/projection_std_ratio", "collapse/projection_effective_rank",
            "collapse/representation_std_ratio")


def collapse_metrics(name: str, x: jax.Array, *, effective_rank: bool = True
                     ) -> dict[str, jax.Array]:
    """Collapse monitors of a batch of outputs (B, d).

    ``std``: mean over features of the batch std of l2-normalised outputs; 1/sqrt(d) for vectors
    spread uniformly on the sphere, 0 when every input maps to the same vector (``std_ratio`` is
    std x sqrt(d), so 1 is healthy). ``effective_rank``: exp of the entropy of the normalised
    singular values of the centred outputs (Roy & Vetterli, 2007), between 1 and min(B, d);
    computed from the d x d covariance (an eigendecomposition, cheap for the 256-d projections;
    skipped for the 2048 x width representations).
    """
    unit = l2_normalize(x.astype(jnp.float32))
    std = jnp.mean(jnp.std(unit, axis=0))
    metrics = {f"collapse/{name}_std": std,
               f"collapse/{name}_std_ratio": std * jnp.sqrt(x.shape[-1])}
    if effective_rank:
        centred = unit - unit.mean(axis=0)
        singular = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(centred.T @ centred), 0.0))
        p = singular / jnp.maximum(singular.sum(), 1e-12)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0))
        metrics[f"collapse/{name}_effective_rank"] = jnp.exp(entropy)
    return metrics


def warn_on_collapse(step: int, scalars: Mapping[str, float]) -> None:
    """A warning naming the step when the projections or representations look collapsed."""
    for name in ("projection", "representation"):
        ratio = scalars.get(f"collapse/{name}_std_ratio")
        if ratio is not None and ratio < COMPLETE_COLLAPSE_STD_RATIO:
            rank = scalars.get(f"collapse/{name}_effective_rank")  # not computed for y
            logging.warning(
                "step %d: possible collapse: batch std of normalised %ss is %.3f x 1/sqrt(d) "
                "(warning threshold %.3f)%s", step, name, ratio, COMPLETE_COLLAPSE_STD_RATIO,
                "" if rank is None else f"; effective rank {rank:.1f}")


def collapse_verdict(stats: Mapping[str, Any], projection_size: int | None) -> str | None:
    """"complete", "dimensional" or "no" from the seed-averaged final monitors."""
    std_ratio = stats.get("collapse/projection_std_ratio", {}).get("mean")
    rank = stats.get("collapse/projection_effective_rank", {}).get("mean")
    if std_ratio is None:
        return None
    if std_ratio < COMPLETE_COLLAPSE_STD_RATIO:
        return "complete"
    if rank is not None and projection_size and \
            rank < DIMENSIONAL_COLLAPSE_RANK_FRACTION * projection_size:
        return "dimensional"
    return "no"
