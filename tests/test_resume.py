"""Resume when things change, in process: config changes refused or recorded, an
intact checkpoint of another layout called incompatible (not damaged), the workdir lease, keep
period, one-line write errors, verified reads for evaluation and export, atomic export, and
monitors that fail without ending the run."""

import errno
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing import (
    Checkpointer,
    CheckpointWriteError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    config_changes,
    flatten_dotted,
    read_verified,
)
from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.evaluation.monitor import Monitor
from byol_flax.export import encoder as export
from byol_flax.schedules import build_schedules
from byol_flax.train_state import create_train_state
from byol_flax.weights import encoder as weights
from byol_flax.weights.checkpoint import read_encoder
from tests.helpers import tiny_config
from tests.test_checkpointing import new_state, one_device


def record(config, data="a" * 64):
    return config_changes.run_record(config.to_json_best_effort(), data)


# --- Config changes ----------------------------------------------------------------------------


def test_changes_that_alter_training_are_refused_with_old_and_new_values():
    saved = tiny_config()
    changed = tiny_config()
    changed.training.batch_size = 32
    changed.training.epochs = 8.0
    changed.optimizer.base_learning_rate = 0.3
    with pytest.raises(config_changes.ConfigChangeError) as caught:
        config_changes.check_resume(record(saved), record(changed), step=20, where="W")
    message = str(caught.value)
    assert "training.batch_size: 16 -> 32" in message
    assert "training.epochs: 1000.0 -> 8.0" in message
    assert "optimizer.base_learning_rate: 0.2 -> 0.3" in message
    assert ("--allow_config_change=optimizer.base_learning_rate,training.batch_size,"
            "training.epochs") in message
    assert "\n" not in message and "intact" in message


@pytest.mark.parametrize("key,value", [("seed", 7), ("target.base_ema", 0.99),
                                       ("optimizer.predictor_lr_multiplier", 10.0),
                                       ("optimizer.weight_decay", 0.0), ("loss.beta", 1.0),
                                       ("augment.view1.blur_prob", 0.5)])
def test_every_trained_key_is_refused(key, value):
    changed = tiny_config()
    section, name = key.rsplit(".", 1) if "." in key else ("", key)
    target = changed
    for part in filter(None, section.split(".")):
        target = target[part]
    target[name] = value
    with pytest.raises(config_changes.ConfigChangeError, match=key.replace(".", r"\.")):
        config_changes.check_resume(record(tiny_config()), record(changed), step=1, where="W")


def test_a_key_added_later_compares_as_its_old_behaviour_when_a_checkpoint_lacks_it():
    """A checkpoint written before augment.crop_reduced_decode existed resumes under the default
    (full decoding, what it did); turning the key on is still a trained change."""
    saved = record(tiny_config())
    del saved["config"]["augment"]["crop_reduced_decode"]
    assert config_changes.check_resume(saved, record(tiny_config()), step=1, where="W") == []
    reduced = tiny_config()
    reduced.augment.crop_reduced_decode = True
    with pytest.raises(config_changes.ConfigChangeError,
                       match=r"augment\.crop_reduced_decode: False -> True"):
        config_changes.check_resume(saved, record(reduced), step=1, where="W")


def test_other_data_is_refused_but_the_same_data_elsewhere_is_not():
    moved = tiny_config()
    moved.data.dir = "/elsewhere"  # same manifest: a copy of the same data
    changes = config_changes.check_resume(record(tiny_config()), record(moved), step=1, where="W")
    assert [c["key"] for c in changes] == ["data.dir"] and changes[0]["kind"] == "runtime"
    with pytest.raises(config_changes.ConfigChangeError, match="data.manifest_sha256"):
        config_changes.check_resume(record(tiny_config()), record(moved, data="b" * 64), step=1,
                                    where="W")


def test_runtime_keys_change_freely_and_allowed_keys_are_recorded(tmp_path):
    changed = tiny_config()
    changed.data.worker_count = 2
    changed.monitor.every_steps = 10
    changed.model.conv_implementation = "xla"
    changed.checkpoint.every_steps = 7
    changed.training.epochs = 8.0
    changes = config_changes.check_resume(record(tiny_config()), record(changed), step=20,
                                          where="W", allowed=["training"])
    kinds = {c["key"]: c["kind"] for c in changes}
    assert kinds == {"data.worker_count": "runtime", "monitor.every_steps": "runtime",
                     "model.conv_implementation": "runtime", "checkpoint.every_steps": "runtime",
                     "training.epochs": "trained"}
    config_changes.record_changes(tmp_path, 20, changes)
    config_changes.record_changes(tmp_path, 30, changes[:1])
    assert len(config_changes.read_history(tmp_path)) == len(changes) + 1
    assert len(config_changes.read_history(tmp_path, up_to_step=20)) == len(changes)


# --- Incompatible is not damaged ---------------------------------------------------------------


def save(directory, config, steps, run=None):
    config.checkpoint.async_save = False
    config.checkpoint.max_to_keep = 10
    _, state = new_state(config)
    checkpointer = Checkpointer(directory, config, run)
    for step in steps:
        checkpointer.save(step, state, counters={"examples_consumed": step * 16})
    checkpointer.wait_until_finished()
    checkpointer.close()
    return state


def test_an_intact_checkpoint_of_another_state_layout_is_incompatible_and_left_in_place(tmp_path):
    config = tiny_config()
    save(tmp_path, config, [2, 4])
    other = tiny_config()
    other.checkpoint.async_save = False
    other.model.online_classifier = True
    lr, _ = build_schedules(other, total_steps=10, warmup_steps=1)
    _, state = nnx.split(create_train_state(other, lr, num_classes=10))  # one more module
    with pytest.raises(IncompatibleCheckpointError) as caught:
        Checkpointer(tmp_path, other).restore_latest(state, one_device())
    message = str(caught.value)
    assert "checkpoint step 4" in message and "is intact" in message
    assert "classifier" in message and "only in the config's state" in message
    assert "damaged" not in message and "move" not in message
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "4"]


def test_multiplier_change_restores_into_the_same_layout(tmp_path):
    config = tiny_config()
    saved = save(tmp_path, config, [3])
    changed = tiny_config()
    changed.optimizer.predictor_lr_multiplier = 10.0
    _, fresh = new_state(changed)
    restored = Checkpointer(tmp_path, changed).restore_latest(fresh, one_device())
    assert restored.step == 3 and restored.counters == {"examples_consumed": 48}
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored.state)):
        np.testing.assert_array_equal(a, b)


# --- Retention and write errors ----------------------------------------------------------------


def test_keep_period_keeps_multiples_besides_the_newest(tmp_path):
    config = tiny_config()
    config.checkpoint.async_save = False
    config.checkpoint.max_to_keep = 2
    config.checkpoint.keep_period = 4
    _, state = new_state(config)
    checkpointer = Checkpointer(tmp_path, config)
    for step in range(1, 11):
        checkpointer.save(step, state)
    checkpointer.wait_until_finished()
    assert sorted(checkpointer.manager.all_steps()) == [4, 8, 9, 10]
    checkpointer.close()


def test_a_failed_asynchronous_save_is_one_line_naming_the_path_and_last_intact_step(tmp_path):
    config = tiny_config()
    _, state = new_state(config)
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(4, state)
    checkpointer.wait_until_finished()
    checkpointer.save(8, state)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpointer.manager.wait_until_finished = disk_full  # the save of step 8 failed
    with pytest.raises(CheckpointWriteError) as caught:
        checkpointer.save(12, state)
    message = str(caught.value)
    assert f"cannot write checkpoint step 8 to {tmp_path}" in message
    assert "No space left on device" in message and "last intact checkpoint is step 4" in message
    assert "\n" not in message


# --- Verified reads for evaluation and export --------------------------------------------------


def alter_an_encoder_array(step_dir):
    """Makes one stored encoder array disagree with its checksum (as a flipped bit in it would;
    where a flipped byte of Orbax's shared data files lands is not chosen by the test)."""
    path = step_dir / "integrity" / "metadata"
    integrity = json.loads(path.read_text())
    key = next(k for k in sorted(integrity["checksums"]) if k.startswith("online.encoder."))
    integrity["checksums"][key] = (integrity["checksums"][key] + 1) % 2**32
    path.write_text(json.dumps(integrity))


def assert_same_arrays(got, expected):
    """Equal arrays at equal paths (Orbax reads list indices back as strings)."""
    got, expected = flatten_dotted(got), flatten_dotted(expected)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_verified_read_skips_a_damaged_newest_step_and_refuses_it_when_named(tmp_path):
    config = tiny_config()
    state = save(tmp_path, config, [2, 4])
    alter_an_encoder_array(tmp_path / "4")
    step, arrays, _ = read_verified(tmp_path, prefix=("online", "encoder"))
    assert step == 2
    assert_same_arrays(arrays, nnx.to_pure_dict(state)["online"]["encoder"])
    with pytest.raises(DamagedCheckpointError, match="step 4|/4"):
        read_verified(tmp_path, prefix=("online", "encoder"), step=4)
    with pytest.raises(DamagedCheckpointError, match=r"not a committed checkpoint.*\[2, 4\]"):
        read_verified(tmp_path, prefix=("online", "encoder"), step=3)


def test_the_encoder_of_a_workdir_is_read_with_the_config_its_step_trained_with(tmp_path):
    config = tiny_config()
    config.training.epochs = 4.0
    state = save(tmp_path / "checkpoints", config, [2, 4], run=record(config))
    alter_an_encoder_array(tmp_path / "checkpoints" / "4")
    saved = read_encoder(tmp_path)
    assert saved.step == 2
    assert_same_arrays(saved.arrays, nnx.to_pure_dict(state)["online"]["encoder"])
    assert saved.model_config["encoder"]["name"] == "resnet_tiny"
    assert saved.pretrain_config["training"]["epochs"] == 4.0
    assert saved.pretrain_config["config_history"] == []
    with pytest.raises(DamagedCheckpointError, match="none committed"):
        read_encoder(tmp_path / "elsewhere")


def test_export_reads_the_config_the_step_was_trained_with(tmp_path):
    config = tiny_config()
    config.training.epochs = 4.0
    save(tmp_path / "checkpoints", config, [5], run=record(config))
    later = tiny_config()
    later.training.epochs = 99.0  # what a later, different run wrote: not what step 5 trained
    (tmp_path / "config.json").write_text(later.to_json_best_effort())
    pretrained = weights.load_pretraining_encoder(tmp_path)
    assert pretrained.pretrain_config["training"]["epochs"] == 4.0
    assert pretrained.origin["step"] == 5


def test_a_failed_export_leaves_the_previous_export_intact(tmp_path):
    config = tiny_config()
    save(tmp_path / "checkpoints", config, [5], run=record(config))
    pretrained = weights.load_pretraining_encoder(tmp_path)
    out = tmp_path / "export"
    export.export_encoder(pretrained, out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def fail(directory):
        raise OSError("disk full while writing the model card")

    with pytest.raises(OSError, match="model card"):
        export.export_encoder(pretrained, out, write_extra=fail)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if "export-" in p.name] == []
    weights.load_export(out)  # still loads


# The workdir lease: tests/test_lease.py (local and gs://) and tests/test_relaunch.py (hosts).


# --- Monitors ----------------------------------------------------------------------------------


class Failing:
    name = "broken"

    def run(self, state):
        raise RuntimeError("monitor bug")


class Working:
    name = "knn"

    def run(self, state):
        return {"knn/top1": 0.5}


def monitor(evaluators, config, guard, total_steps=5):
    return Monitor(evaluators, config, total_steps=total_steps, termination=guard)


def test_a_failing_monitor_is_logged_and_counted_and_training_goes_on(caplog):
    config = tiny_config()
    guard = TerminationGuard(enabled=False)
    with caplog.at_level(logging.ERROR):
        scalars = monitor([Failing(), Working()], config, guard).maybe_run(5, None)
    assert scalars == {"monitor_errors/broken": 1.0, "knn/top1": 0.5}
    failure = next(r for r in caplog.records if "monitor broken failed" in r.getMessage())
    assert failure.exc_info is not None  # the traceback is in the log
    config.monitor.errors_are_fatal = True
    with pytest.raises(RuntimeError, match="monitor bug"):
        monitor([Failing()], config, guard).maybe_run(5, None)


def test_a_pending_sigterm_skips_the_monitors():
    guard = TerminationGuard(enabled=False)
    guard.requested = True
    assert monitor([Working()], tiny_config(), guard).maybe_run(5, None) == {}


def test_monitors_run_every_monitor_every_steps_and_at_the_last_step():
    config = tiny_config()
    config.monitor.every_steps = 4
    watch = monitor([Working()], config, TerminationGuard(enabled=False), total_steps=10)
    due = [step for step in range(1, 11) if watch.maybe_run(step, None) is not None]
    assert due == [4, 8, 10]
    config.monitor.every_steps = 0  # monitors off
    assert monitor([Working()], config, TerminationGuard(enabled=False)).maybe_run(5, None) is None
