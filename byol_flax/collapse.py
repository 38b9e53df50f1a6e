"""Collapse monitoring: the failure BYOL's predictor and slow-moving target exist to prevent.

Computed inside the train step on every batch (:func:`collapse_metrics`; the effective rank
from the logging step's batch, :func:`with_effective_ranks`), warned about by the
training loop at logging steps (:class:`CollapseWatch`), and turned into a verdict by the
study summaries (:func:`collapse_verdict`), all against the thresholds defined here once.
"""

import logging
from collections.abc import Callable, Mapping
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


# The step returns the centred Gram matrix of a batch's l2-normalised outputs under
# "collapse/<name>" + GRAM_SUFFIX; the logging step turns the last step's matrix into the
# effective rank (:func:`with_effective_ranks`). An eigendecomposition in every step cost 8% of
# a small ViT's step and 3% of ResNet-18's (docs/performance.md) for a value read once per
# logging window, so the rank is a snapshot of the logging step's batch, as the learning rate is.
GRAM_SUFFIX = "_centred_gram"


def collapse_metrics(name: str, x: jax.Array, *, effective_rank: bool = True
                     ) -> dict[str, jax.Array]:
    """Collapse monitors of a batch of outputs (B, d).

    ``std``: mean over features of the batch std of l2-normalised outputs; 1/sqrt(d) for vectors
    spread uniformly on the sphere, 0 when every input maps to the same vector (``std_ratio`` is
    std x sqrt(d), so 1 is healthy). ``effective_rank``: the d x d centred Gram matrix from
    which :func:`effective_rank_of_gram` computes the rank (cheap to form for the 256-d
    projections; skipped for the 2048 x width representations).
    """
    unit = l2_normalize(x.astype(jnp.float32))
    std = jnp.mean(jnp.std(unit, axis=0))
    metrics = {f"collapse/{name}_std": std,
               f"collapse/{name}_std_ratio": std * jnp.sqrt(x.shape[-1])}
    if effective_rank:
        centred = unit - unit.mean(axis=0)
        metrics[f"collapse/{name}{GRAM_SUFFIX}"] = centred.T @ centred
    return metrics


def effective_rank_of_gram(gram: jax.Array) -> jax.Array:
    """exp of the entropy of the normalised singular values of centred outputs (Roy & Vetterli,
    2007), between 1 and min(B, d), from their Gram matrix (the singular values are the square
    roots of its eigenvalues)."""
    singular = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram), 0.0))
    p = singular / jnp.maximum(singular.sum(), 1e-12)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0))
    return jnp.exp(entropy)


def is_gram(key: str) -> bool:
    """Whether a step metric is a Gram matrix (a snapshot for :func:`with_effective_ranks`)."""
    return key.endswith(GRAM_SUFFIX)


@jax.jit
def with_effective_ranks(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``metrics`` with each Gram matrix replaced by its effective rank
    (``collapse/<name>_effective_rank``); run where the values are read, not in every step."""
    return {(key.removesuffix(GRAM_SUFFIX) + "_effective_rank" if is_gram(key) else key):
            (effective_rank_of_gram(value) if is_gram(key) else value)
            for key, value in metrics.items()}


# A representation dominated by one vector shared by every image: the batch std of its
# l2-normalised vectors below this fraction of 1/sqrt(d). Not a collapse of what the loss sees
# (the projector's first BatchNorm subtracts the shared vector), but the linear probe and the
# online classifier read the representation with it. Calibrated on the digits
# (docs/demo_calibration.md, "Which runs the collapse monitor flags"): healthy runs end at
# 0.58-0.59 (ResNet) and 0.94-0.98 (ViT with a BatchNorm final norm); the LayerNorm ViTs whose
# paper probe lost to random initialisation at 0.02-0.14, except AdamW's at 0.51, which it misses.
SHARED_REPRESENTATION_STD_RATIO = 0.2


class CollapseWatch:
    """Warnings at logging steps when a monitor crosses its threshold: once when it falls under
    (naming the step and what it means), an info line when it recovers, nothing in between, so
    a run that stays under does not repeat the warning at every logging step."""

    def __init__(self) -> None:
        self._under: set[str] = set()

    def __call__(self, step: int, scalars: Mapping[str, float]) -> None:
        projection = scalars.get("collapse/projection_std_ratio")
        representation = scalars.get("collapse/representation_std_ratio")
        rank = scalars.get("collapse/projection_effective_rank")
        self._check(
            step, "projection", projection, COMPLETE_COLLAPSE_STD_RATIO,
            lambda: f"possible collapse: batch std of normalised projections is {projection:.3f}"
                    f" x 1/sqrt(d) (warning threshold {COMPLETE_COLLAPSE_STD_RATIO:.3f})"
                    + ("" if rank is None else f"; effective rank {rank:.1f}"))
        self._check(
            step, "representation", representation, SHARED_REPRESENTATION_STD_RATIO,
            lambda: f"the representation is dominated by a vector shared by every image: "
                    f"batch std of normalised representations is {representation:.3f} x "
                    f"1/sqrt(d) (warning threshold {SHARED_REPRESENTATION_STD_RATIO:.3f}); the "
                    "loss does not see it (the projector's BatchNorm removes it), linear probes "
                    "and the online classifier do (linear.feature_norm=batchnorm standardises it)")

    def _check(self, step: int, name: str, value: float | None, threshold: float,
               message: Callable[[], str]) -> None:
        if value is None:
            return
        if value < threshold and name not in self._under:
            self._under.add(name)
            logging.warning("step %d: %s", step, message())
        elif value >= threshold and name in self._under:
            self._under.discard(name)
            logging.info("step %d: the %s std ratio is back above %.3f (%.3f)", step, name,
                         threshold, value)


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
