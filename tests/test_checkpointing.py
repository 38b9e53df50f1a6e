"""Orbax checkpoints: other mesh sizes, incompatible configs, stale temporary directories."""

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing import Checkpointer, IncompatibleCheckpointError
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicated_sharding
from byol_flax.train_state import create_train_state
from tests.helpers import tiny_config


def new_state(config):
    lr, _ = build_schedules(config, total_steps=10, warmup_steps=1)
    return nnx.split(create_train_state(config, lr))


def data_iterator():
    return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def flat(state):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def save_initial_state(directory, step: int):
    """A synchronous save of a fresh tiny state at ``step``; returns the config used."""
    config = tiny_config()
    config.checkpoint.async_save = False
    _, state = new_state(config)
    checkpointer = Checkpointer(directory, config)
    checkpointer.save(step, state, data_iterator())
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
    saved_iterator = data_iterator()
    next(saved_iterator), next(saved_iterator)
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(7, state, saved_iterator)
    checkpointer.wait_until_finished()

    config.seed += 1  # a different initialisation, overwritten by the restore
    _, fresh = new_state(config)
    eight_devices = make_mesh(jax.devices()[:8])
    iterator = data_iterator()
    restored = Checkpointer(tmp_path, config).restore(7, fresh, iterator,
                                                      replicated_sharding(eight_devices))
    leaf = jax.tree.leaves(restored)[0]
    assert len(leaf.sharding.device_set) == 8
    expected, got = flat(state), flat(restored)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(next(iterator), np.arange(8, 12))  # the third batch


def test_checkpoint_of_another_architecture_names_the_difference(tmp_path):
    config = save_initial_state(tmp_path, step=1)
    config.model.projector.output_size = 48
    _, other = new_state(config)
    with pytest.raises(IncompatibleCheckpointError,
                       match=r"step 1 .* model.projector.output_size: checkpoint 32, config 48"):
        Checkpointer(tmp_path, config).restore(1, other, data_iterator(), one_device())


def test_stale_temporary_directories_are_not_checkpoints(tmp_path):
    config = save_initial_state(tmp_path, step=3)
    stale = tmp_path / "9.orbax-checkpoint-tmp"  # a save killed half-way (Orbax's naming)
    stale.mkdir()
    (stale / "junk").write_text("partial")
    reopened = Checkpointer(tmp_path, config)
    assert reopened.latest_step == 3  # the half-written step 9 is not a checkpoint
    _, fresh = new_state(config)
    reopened.restore(3, fresh, data_iterator(), one_device())
