"""Shipped config modules are named by ``--config=NAME[:ARG]`` (byol_flax.config_names.resolve)."""

from pathlib import Path

import pytest

from byol_flax import configs
from byol_flax.runtime import config_names

CONFIG_DIR = Path(configs.__file__).parent


def test_a_name_resolves_to_the_shipped_module_keeping_its_argument():
    assert config_names.resolve("byol_imagenet:r50x1,slice=v4-64") == \
        f"{CONFIG_DIR / 'byol_imagenet.py'}:r50x1,slice=v4-64"
    assert config_names.resolve("digits_cpu") == str(CONFIG_DIR / "digits_cpu.py")
    assert config_names.resolve("table21", subdir="studies") == \
        str(CONFIG_DIR / "studies/table21.py")
    assert config_names.resolve("studies/table21") == str(CONFIG_DIR / "studies/table21.py")


def test_a_path_is_used_as_it_is_once_it_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_configs").mkdir()
    (tmp_path / "my_configs" / "x.py").write_text("def get_config(arg=None): ...\n")
    assert config_names.resolve("my_configs/x.py:arg") == "my_configs/x.py:arg"
    with pytest.raises(config_names.UnknownConfigError, match="'my_configs/y.py' does not exist"):
        config_names.resolve("my_configs/y.py:arg")
    (tmp_path / "z.py").mkdir()
    with pytest.raises(config_names.UnknownConfigError, match="'z.py' is not a file"):
        config_names.resolve("z.py")


def test_an_unknown_name_is_one_error_listing_the_names():
    with pytest.raises(config_names.UnknownConfigError,
                       match="'nosuch:arg' is neither.*digits_cpu"):
        config_names.resolve("nosuch:arg")
    with pytest.raises(config_names.UnknownConfigError, match="common"):  # a helper, not a config
        config_names.resolve("common")


def test_names_list_every_config_and_study_module():
    shipped = {p.stem for p in CONFIG_DIR.glob("*.py")
               if "def get_config(" in p.read_text() and not p.name.startswith("_")}
    assert set(config_names.names()) == shipped and "digits_cpu" in shipped
    assert "studies/table21" in config_names.names("studies")


def test_both_flag_forms_are_resolved_and_overrides_left_alone():
    argv = ["prog", "--config=digits_cpu:data=X", "--config.seed=3", "--workdir", "W"]
    assert config_names.resolve_flag(argv) == [
        "prog", f"--config={CONFIG_DIR / 'digits_cpu.py'}:data=X", "--config.seed=3",
        "--workdir", "W"]
    assert config_names.resolve_flag(["prog", "--study", "table21"], "study", subdir="studies") == [
        "prog", "--study", str(CONFIG_DIR / "studies/table21.py")]


def test_float16_compute_is_refused_naming_bfloat16():
    """float16 would need loss scaling (its range underflows small gradients); bfloat16 has
    float32's range and runs on A100, H100 and TPU."""
    from byol_flax.config import ConfigError, base_config, validate_config

    config = base_config()
    config.data.dir = "/data/x"
    for dtype in ("float32", "bfloat16"):
        config.model.compute_dtype = dtype
        validate_config(config, num_devices=1)
    config.model.compute_dtype = "float16"
    with pytest.raises(ConfigError, match=r"config\.model\.compute_dtype='float16' .*loss "
                                          r"scaling.*use bfloat16") as error:
        validate_config(config, num_devices=1)
    assert "\n" not in str(error.value)
