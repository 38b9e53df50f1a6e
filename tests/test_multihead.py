"""Linear evaluation's LR grid in one pass (byol_flax.evaluation.heads): every head is the
classifier a single-LR run of its LR trains, and the per-LR protocol's answer is unchanged."""

import json

import jax
import numpy as np
from flax import nnx

from byol_flax.configs import eval_digits
from byol_flax.data.pipeline import labelled_dataset, open_split
from byol_flax.evaluation import classifier as clf
from byol_flax.evaluation import heads
from byol_flax.evaluation.resumable import UnitCheckpoints
from byol_flax.sharding import make_mesh
from byol_flax.weights import encoder as weights
from tests.helpers import tiny_config

STEPS = 4


def no_checkpoints(total: int = STEPS) -> UnitCheckpoints:
    return UnitCheckpoints(None, {}, every_steps=0, total_steps=total)


def tiny_encoder() -> nnx.Module:
    return weights.encoder_from_model_config(json.loads(tiny_config().model.to_json()), seed=1)


def image_batches(data_dir: str):
    config = eval_digits.get_config(f"linear,data={data_dir}")
    config.data.image_size = 8
    opened = open_split(config.data, "train")
    return iter(labelled_dataset(config, opened, indices=None, batch_size=32, augment=True,
                                 seed=0))


def test_each_head_is_its_single_lr_run_and_the_per_lr_classifier(data_dir):
    """Head of LR 0.5 in a 3-head pass == a 1-head pass of 0.5 == the per-LR path's Classifier
    head. The first is the same steps in a batched program: bitwise on a Xeon, 1.2e-5 relative
    (3.7e-9 absolute) on an AMD EPYC, where XLA:CPU orders the batched matmul's sums
    differently; the second is another program (float tolerance)."""
    encoder, mesh, spec = tiny_encoder(), make_mesh(), clf.SgdSpec(total_steps=STEPS)
    common = dict(num_classes=10, spec=spec, mesh=mesh, seed=0, checkpoints=no_checkpoints())
    grid, _ = heads.train_heads(nnx.clone(encoder), image_batches(data_dir),
                                learning_rates=[0.05, 0.5, 2.0], **common)
    single, _ = heads.train_heads(nnx.clone(encoder), image_batches(data_dir),
                                  learning_rates=[0.5], **common)
    np.testing.assert_allclose(grid["kernel"][1], single["kernel"][0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grid["bias"][1], single["bias"][0], rtol=1e-5, atol=1e-8)
    old = clf.train_classifier(clf.Classifier(nnx.clone(encoder), 10), image_batches(data_dir),
                               spec=spec, learning_rate=0.5, train_encoder=False, mesh=mesh,
                               seed=0)
    np.testing.assert_allclose(grid["kernel"][1], old.head.kernel[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grid["bias"][1], old.head.bias[...], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(grid["kernel"][0], grid["kernel"][1])  # the LRs do differ


def test_heads_on_features_match_single_lr_runs_and_the_per_lr_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    y = rng.integers(0, 4, 400).astype(np.int32)
    spec = clf.SgdSpec(total_steps=20)
    common = dict(num_classes=4, spec=spec, batch_size=64, seed=0,
                  checkpoints=no_checkpoints(20))
    grid, _ = heads.fit_heads_on_features(x, y, learning_rates=[0.1, 0.5, 1.0], **common)
    single, _ = heads.fit_heads_on_features(x, y, learning_rates=[0.5], **common)
    chunked, _ = heads.fit_heads_on_features(x, y, learning_rates=[0.1, 0.5, 1.0],
                                             chunk_steps=7, **common)
    np.testing.assert_array_equal(grid["kernel"][1], single["kernel"][0])
    jax.tree.map(np.testing.assert_array_equal, grid, chunked)  # checkpoint chunks change nothing
    old = clf.fit_linear_on_features(x, y, num_classes=4, spec=spec, learning_rate=0.5,
                                     batch_size=64, seed=0)
    np.testing.assert_allclose(grid["kernel"][1], old["kernel"], rtol=1e-5, atol=1e-6)


def test_a_diverging_head_is_reported_without_spoiling_the_others():
    rng = np.random.default_rng(1)
    x = 1e3 * rng.normal(size=(128, 8)).astype(np.float32)
    y = rng.integers(0, 3, 128).astype(np.int32)
    spec = clf.SgdSpec(total_steps=30, schedule="constant")
    grid, losses = heads.fit_heads_on_features(
        x, y, num_classes=3, spec=spec, learning_rates=[1e-6, float("inf")], batch_size=64, seed=0,
        checkpoints=no_checkpoints(30))
    kept, diverged = heads.unstack(grid, losses, [1e-6, float("inf")])
    assert isinstance(diverged, FloatingPointError) and "inf" in str(diverged)
    assert np.all(np.isfinite(kept["kernel"]))
