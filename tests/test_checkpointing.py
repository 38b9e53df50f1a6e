"""Orbax checkpoints: other mesh sizes, incompatible configs, stale temporary directories,
damaged steps (truncated, flipped, empty) and the fallback to the newest valid one; the save
policy (cadence, last step, SIGTERM)."""

import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing import (
    Checkpointer,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    committed_steps,
)
from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicated_sharding
from byol_flax.train_state import create_train_state
from tests.helpers import tiny_config


def new_state(config):
    lr, _ = build_schedules(config, total_steps=10, warmup_steps=1)
    return nnx.split(create_train_state(config, lr))


def flat(state):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def save_initial_state(directory, step: int):
    """A synchronous save of a fresh tiny state at ``step``; returns the config used."""
    config = tiny_config()
    config.checkpoint.async_save = False
    _, state = new_state(config)
    checkpointer = Checkpointer(directory, config)
    checkpointer.save(step, state)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return config


def one_device():
    return replicated_sharding(make_mesh(jax.devices()[:1]))


def test_restore_onto_a_mesh_of_another_size(tmp_path):
    config = tiny_config()
    config.checkpoint.async_save = False
    _, state = new_state(config)
    one_device = make_mesh(jax.devices()[:1])
    state = jax.device_put(state, replicated_sharding(one_device))
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(7, state, counters={"examples_consumed": 8})
    checkpointer.wait_until_finished()

    config.seed += 1  # a different initialisation, overwritten by the restore
    _, fresh = new_state(config)
    eight_devices = make_mesh(jax.devices()[:8])
    restored = Checkpointer(tmp_path, config).restore(7, fresh,
                                                      replicated_sharding(eight_devices))
    assert restored.counters == {"examples_consumed": 8}
    restored = restored.state
    leaf = jax.tree.leaves(restored)[0]
    assert len(leaf.sharding.device_set) == 8
    expected, got = flat(state), flat(restored)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_checkpoint_of_another_architecture_names_the_difference(tmp_path):
    config = save_initial_state(tmp_path, step=1)
    config.model.projector.output_size = 48
    _, other = new_state(config)
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"step 1 .* is intact but .* model.projector.output_size: "
                             r"checkpoint 32, config 48"):
        Checkpointer(tmp_path, config).restore(1, other, one_device())


def test_stale_temporary_directories_are_not_checkpoints(tmp_path):
    config = save_initial_state(tmp_path, step=3)
    stale = tmp_path / "9.orbax-checkpoint-tmp"  # a save killed half-way (Orbax's naming)
    stale.mkdir()
    (stale / "junk").write_text("partial")
    reopened = Checkpointer(tmp_path, config)
    assert reopened.latest_step == 3  # the half-written step 9 is not a checkpoint
    _, fresh = new_state(config)
    reopened.restore(3, fresh, one_device())


def save_steps(directory, steps, config=None):
    """Synchronous saves of distinct tiny states at ``steps``; returns the config and states."""
    config = config or tiny_config()
    config.checkpoint.async_save = False
    config.checkpoint.max_to_keep = 10
    _, state = new_state(config)
    checkpointer = Checkpointer(directory, config)
    states = {}
    for step in steps:
        state = jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, state)
        states[step] = flat(state)
        checkpointer.save(step, state, counters={"skipped_records": step})
    checkpointer.wait_until_finished()
    checkpointer.close()
    return config, states


def largest_array_file(step_dir):
    """The biggest file of the state item: array data (TensorStore chunks)."""
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)


def flip_bit(path, offset_fraction=0.5, bit=3):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty_step_dir"])
def test_damaged_newest_step_falls_back_to_the_previous_valid_one(tmp_path, damage, caplog):
    config, states = save_steps(tmp_path, [2, 4])
    newest = tmp_path / "4"
    if damage == "truncate":
        target = largest_array_file(newest)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        flip_bit(largest_array_file(newest))
    else:
        shutil.rmtree(newest)
        newest.mkdir()
    _, fresh = new_state(config)
    checkpointer = Checkpointer(tmp_path, config)
    with caplog.at_level(logging.ERROR):
        restored = checkpointer.restore_latest(fresh, one_device())
    assert restored.step == 2 and restored.counters == {"skipped_records": 2}
    got = flat(restored.state)
    for name, value in states[2].items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert any("checkpoint step 4" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "4").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("4.damaged")]
    # The run can write step 4 again after the fallback.
    checkpointer.save(4, restored.state)
    checkpointer.wait_until_finished()
    assert checkpointer.latest_step == 4


def test_a_flipped_bit_is_caught_by_the_checksums(tmp_path):
    """Every single-bit change of any array is detected, wherever it lands."""
    _, states = save_steps(tmp_path, [1])
    from byol_flax.checkpointing import state_checksums  # noqa: PLC0415

    pure = {"a": np.arange(1000, dtype=np.float32), "b": np.ones((3, 4), np.uint32)}
    reference = state_checksums(pure)
    rng = np.random.default_rng(0)
    for _ in range(20):
        key = str(rng.choice(["a", "b"]))
        changed = {k: v.copy() for k, v in pure.items()}
        flat_view = changed[key].reshape(-1).view(np.uint32)
        flat_view[rng.integers(flat_view.size)] ^= np.uint32(1) << np.uint32(rng.integers(32))
        assert state_checksums(changed)[key] != reference[key]
    swapped = {k: v.copy() for k, v in pure.items()}
    swapped["a"][[3, 7]] = swapped["a"][[7, 3]]
    assert state_checksums(swapped)["a"] != reference["a"]


def test_no_valid_step_stops_instead_of_starting_over(tmp_path):
    config, _ = save_steps(tmp_path, [3])
    flip_bit(largest_array_file(tmp_path / "3"))
    _, fresh = new_state(config)
    with pytest.raises(DamagedCheckpointError, match=r"no restorable checkpoint .* steps \[3\]"):
        Checkpointer(tmp_path, config).restore_latest(fresh, one_device())


# --- The save policy: cadence, last step, preemption ---------------------------------------------


def test_maybe_save_saves_every_n_steps_and_the_last_step_and_checks_before_saving(tmp_path):
    config = tiny_config()
    config.checkpoint.every_steps = 4
    config.checkpoint.max_to_keep = 10
    _, state = new_state(config)
    checkpointer = Checkpointer(tmp_path, config, total_steps=10)
    checked = []
    stops = [checkpointer.maybe_save(step, state, {"examples_consumed": 16 * step},
                                     check=lambda step=step: checked.append(step))
             for step in range(1, 11)]
    checkpointer.wait_until_finished()
    assert not any(stops) and checked == [4, 8, 10]
    assert sorted(checkpointer.manager.all_steps()) == [4, 8, 10]
    assert checkpointer.last_saved == 10

    def refuse():
        raise FloatingPointError("not finite")

    with pytest.raises(FloatingPointError):  # a refused save writes nothing
        checkpointer.maybe_save(12, state, {}, check=refuse)
    assert sorted(checkpointer.manager.all_steps()) == [4, 8, 10]
    checkpointer.close()


def test_a_sigterm_saves_the_current_step_commits_it_and_asks_to_stop(tmp_path):
    config = tiny_config()
    config.checkpoint.every_steps = 100
    config.checkpoint.async_save = True
    _, state = new_state(config)
    before = signal.getsignal(signal.SIGTERM)
    guard = TerminationGuard()
    try:
        checkpointer = Checkpointer(tmp_path, config, total_steps=1000, termination=guard)
        assert not checkpointer.maybe_save(1, state, {})
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
        assert checkpointer.maybe_save(2, state, {"examples_consumed": 32})
        assert committed_steps(tmp_path) == [2]  # committed before it answers: exit is safe
        checkpointer.close()
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGTERM) == before
