"""Collapse monitoring: the monitors' values on known cases, the warning, the study verdict."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_flax import collapse


def test_monitors_are_1_for_spread_vectors_and_0_for_a_collapsed_batch():
    spread = jax.random.normal(jax.random.key(0), (4096, 16))
    metrics = collapse.with_effective_ranks(collapse.collapse_metrics("x", spread))
    assert metrics["collapse/x_std_ratio"] == pytest.approx(1.0, abs=0.03)
    assert metrics["collapse/x_effective_rank"] == pytest.approx(16, rel=0.05)
    same = jnp.tile(spread[:1], (64, 1))
    assert float(collapse.collapse_metrics("x", same)["collapse/x_std_ratio"]) < 1e-3
    line = jnp.outer(jnp.linspace(-1, 1, 64), jnp.ones(16)) + 0.01  # one direction only
    ranks = collapse.with_effective_ranks(collapse.collapse_metrics("x", line))
    assert float(ranks["collapse/x_effective_rank"]) < 1.5
    assert "collapse/x_centred_gram" not in ranks  # the matrix is replaced by its rank
    assert set(collapse.collapse_metrics("x", spread, effective_rank=False)) == {
        "collapse/x_std", "collapse/x_std_ratio"}


def test_collapse_warning_names_the_step_for_projections_and_representations(caplog):
    watch = collapse.CollapseWatch()
    scalars = {"collapse/projection_std_ratio": 0.05, "collapse/projection_effective_rank": 1.3,
               "collapse/representation_std_ratio": 0.03}
    with caplog.at_level(logging.INFO):
        watch(420, scalars)
        messages = [r.getMessage() for r in caplog.records]
        assert any("step 420: possible collapse" in m and "projections is 0.050" in m
                   and "effective rank 1.3" in m for m in messages)
        assert any("step 420: the representation is dominated by a vector shared by every "
                   "image" in m and "representations is 0.030" in m for m in messages)
        caplog.clear()
        watch(430, scalars)  # still under: said once, not at every logging step
        assert not caplog.records
        watch(440, {"collapse/projection_std_ratio": 0.7,
                    "collapse/representation_std_ratio": 0.03})
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        assert "step 440: the projection std ratio is back above" in caplog.records[0].getMessage()
        caplog.clear()
        watch(450, {"collapse/projection_std_ratio": 0.05})  # fell again: said again
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        collapse.CollapseWatch()(421, {"collapse/projection_std_ratio": 0.7,
                                       "collapse/representation_std_ratio": 0.6})
    assert not caplog.records


@pytest.mark.parametrize("std_ratio, rank, verdict", [
    (0.05, 1.0, "complete"), (0.9, 20.0, "dimensional"), (0.9, 200.0, "no"), (None, None, None)])
def test_the_study_verdict_uses_the_same_thresholds(std_ratio, rank, verdict):
    stats = {} if std_ratio is None else {
        "collapse/projection_std_ratio": {"mean": std_ratio},
        "collapse/projection_effective_rank": {"mean": rank}}
    assert collapse.collapse_verdict(stats, projection_size=256) == verdict
    assert 20.0 < collapse.DIMENSIONAL_COLLAPSE_RANK_FRACTION * 256 < 200.0
    assert 0.05 < collapse.COMPLETE_COLLAPSE_STD_RATIO < 0.9
    assert np.isfinite(collapse.COMPLETE_COLLAPSE_STD_RATIO)
