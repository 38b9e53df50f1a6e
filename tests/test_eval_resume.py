"""Resumable evaluation (byol_flax.evaluation.resumable): a training unit stopped by SIGTERM
resumes from its verified checkpoint to exactly the uninterrupted result; damaged steps are
named and skipped, another evaluation's steps refused."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing import DamagedCheckpointError, IncompatibleCheckpointError
from byol_flax.configs import eval_digits
from byol_flax.data.convert import digits
from byol_flax.data.pipeline import labelled_dataset, open_split
from byol_flax.evaluation import classifier as clf
from byol_flax.evaluation import heads
from byol_flax.evaluation.resumable import EvaluationStopped, UnitCheckpoints
from byol_flax.sharding import make_mesh
from byol_flax.weights import encoder as weights
from tests.helpers import tiny_config

STEPS = 12
RECORD = {"unit": "linear_features", "config": {"linear": {"epochs": 1}},
          "points": [{"learning_rate": 0.1}, {"learning_rate": 0.5}]}


class StopAfter:
    """A TerminationGuard whose SIGTERM arrives after ``reads`` step ends."""

    def __init__(self, reads: int):
        self._left = reads

    @property
    def requested(self) -> bool:
        self._left -= 1
        return self._left < 0


def features():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(256, 8)).astype(np.float32),
            rng.integers(0, 3, 256).astype(np.int32))


def fit(directory, *, record=RECORD, termination=None, every=4):
    checkpoints = UnitCheckpoints(directory, record, every_steps=every, total_steps=STEPS,
                                  termination=termination)
    with checkpoints:
        return heads.fit_heads_on_features(
            *features(), num_classes=3, spec=clf.SgdSpec(total_steps=STEPS),
            learning_rates=[0.1, 0.5], batch_size=64, seed=0, checkpoints=checkpoints,
            chunk_steps=every)


def test_sigterm_half_way_then_rerun_gives_the_uninterrupted_heads(tmp_path):
    uninterrupted, _ = fit(None)
    with pytest.raises(EvaluationStopped, match="step 8 of 12.*re-run the same command"):
        fit(tmp_path, termination=StopAfter(1))  # SIGTERM during the second chunk
    resumed, _ = fit(tmp_path)
    for key in ("kernel", "bias"):
        np.testing.assert_array_equal(resumed[key], uninterrupted[key])


def test_a_damaged_step_is_named_and_the_previous_one_used(tmp_path, caplog):
    with pytest.raises(EvaluationStopped):
        fit(tmp_path, termination=StopAfter(1))
    state_files = [p for p in (tmp_path / "8" / "state").rglob("*") if p.is_file()
                   and p.stat().st_size > 0 and "d" in p.parent.name]
    for path in state_files:  # alter the stored arrays of step 8
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    uninterrupted, _ = fit(None)
    resumed, _ = fit(tmp_path)
    assert "step 8" in caplog.text and "trying the previous checkpoint" in caplog.text
    assert list(tmp_path.glob("8.damaged-*"))
    np.testing.assert_array_equal(resumed["kernel"], uninterrupted["kernel"])


def test_another_evaluations_checkpoint_is_refused_and_another_points_replaced(tmp_path):
    with pytest.raises(EvaluationStopped):
        fit(tmp_path, termination=StopAfter(0))
    other = {**RECORD, "config": {"linear": {"epochs": 2}}}
    with pytest.raises(IncompatibleCheckpointError, match="config.linear.epochs"):
        fit(tmp_path, record=other)
    # The same sweep, another unit (a refit of one point): the old steps are removed.
    refit = {**RECORD, "points": [{"learning_rate": 0.5}]}
    fit(tmp_path, record=refit)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["12", "8"]


def test_no_readable_step_is_an_error_not_a_silent_restart(tmp_path):
    with pytest.raises(EvaluationStopped):
        fit(tmp_path, termination=StopAfter(0))
    for path in (tmp_path / "4" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    with pytest.raises((DamagedCheckpointError, IncompatibleCheckpointError)):
        fit(tmp_path)


@pytest.mark.scenario  # a minute on two busy cores: the whole network's step compiles
def test_a_fine_tuning_unit_resumes_to_the_uninterrupted_network(tmp_path):
    """train_classifier (semi-supervised / transfer fine-tuning): network, optimizer state and
    the Grain iterator's position come back; the resumed network equals the uninterrupted one."""
    data = tmp_path / "digits"
    assert digits.main(["--out", str(data), "--holdout-count", "100", "--no-progress"]) == 0
    config = eval_digits.get_config(f"semi_supervised,data={data}")
    config.data.image_size = 8
    opened = open_split(config.data, "train")
    encoder = weights.encoder_from_model_config(json.loads(tiny_config().model.to_json()), seed=1)

    def train(directory, termination=None):
        batches = iter(labelled_dataset(config, opened, indices=None, batch_size=16,
                                        augment=True, seed=0))
        checkpoints = UnitCheckpoints(directory, RECORD, every_steps=0, total_steps=4,
                                      termination=termination)
        with checkpoints:
            model = clf.train_classifier(
                clf.Classifier(nnx.clone(encoder), 10), batches, spec=clf.SgdSpec(total_steps=4),
                learning_rate=0.1, train_encoder=True, mesh=make_mesh(), seed=0,
                checkpoints=checkpoints)
        return nnx.to_pure_dict(nnx.state(model))

    uninterrupted = train(None)
    with pytest.raises(EvaluationStopped, match="step 2 of 4"):
        train(tmp_path / "ckpt", termination=StopAfter(1))
    resumed = train(tmp_path / "ckpt")
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
