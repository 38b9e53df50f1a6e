"""Each config key's role, declared once in ``byol_flax/config.py``, and what derives from it:
the resume check, the model config a checkpoint must match and the train step's cache key."""

import json

import pytest

from byol_flax import config as config_lib
from byol_flax.checkpointing import Checkpointer, config_changes
from byol_flax.config import Role


def _leaf_keys() -> list[str]:
    return list(config_lib.flatten_dotted(json.loads(config_lib.base_config().to_json())))


@pytest.mark.parametrize("key", _leaf_keys())
def test_every_key_has_a_declared_role(key):
    """A key added without a role fails here: its resume behaviour would otherwise be a guess."""
    assert config_lib.role_of(key) is not None, f"{key}: declare its role in base_config"


def test_a_mixed_section_declares_each_key():
    """data mixes trained and runtime keys, so the section has no role of its own: a new data key
    must say which it is."""
    assert config_lib.role_of("data.a_new_key") is None
    assert config_lib.role_of("data.train_split").role is Role.TRAINED
    assert config_lib.role_of("data.worker_count").role is Role.RUNTIME


def test_resume_check_follows_the_roles():
    """Runtime and initialisation keys change freely on resume; trained keys are refused, and a
    key nobody declared counts as trained."""
    runtime = [k for k in _leaf_keys() if config_lib.role_of(k).role is not Role.TRAINED]
    trained = [k for k in _leaf_keys() if config_lib.role_of(k).role is Role.TRAINED]
    assert {"model.conv_implementation", "model.init_from", "checkpoint.every_steps",
            "data.dir"} <= set(runtime)
    assert {"seed", "optimizer.base_learning_rate", "augment.crop_area_min",
            "data.image_size"} <= set(trained)
    assert all(config_changes.is_runtime_key(k) for k in runtime)
    assert not any(config_changes.is_runtime_key(k) for k in trained)
    assert not config_changes.is_runtime_key("undeclared.key")
    assert not config_changes.is_runtime_key(config_changes.DATA_IDENTITY_KEY)


def test_a_checkpoint_matches_only_the_trained_model_keys(tmp_path):
    """The model config saved with a checkpoint (what a restore compares) holds the trained keys
    of config.model and none of the others."""
    config = config_lib.base_config()
    checkpointer = Checkpointer(tmp_path, config)
    try:
        saved = config_lib.flatten_dotted(checkpointer._model_config["model"])
    finally:
        checkpointer.close()
    expected = {key.removeprefix("model.") for key in _leaf_keys() if key.startswith("model.")
                and config_lib.role_of(key).role is Role.TRAINED}
    assert set(saved) == expected
    assert not {"conv_implementation", "init_from", "encoder.zero_init_residual"} & set(saved)


def test_the_step_cache_key_leaves_out_host_and_runtime_keys():
    """Runs that differ only in crops, flips, seed or cadence share one compiled step; a change
    to anything the step computes with does not."""
    config = config_lib.base_config()
    program = config_lib.step_program(config)
    assert "augment.view1.color_jitter_prob" in program
    assert "model.conv_implementation" in program  # runtime, but the program depends on it
    assert not {"seed", "augment.crop_area_min", "augment.view1.flip_prob",
                "checkpoint.every_steps", "model.init_from"} & set(program)
    changed = config_lib.base_config()
    with changed.unlocked():
        changed.seed, changed.augment.crop_area_min = 7, 0.5
    assert config_lib.step_program(changed) == program
    changed.optimizer.momentum = 0.8
    assert config_lib.step_program(changed) != program
