"""Experiment config modules carry the paper's numbers and say how to run them."""

import importlib
import re
from pathlib import Path

import pytest

from byol_flax.config import ConfigError, training_steps, validate_config
from byol_flax.configs import byol_imagenet, common
from byol_flax.evaluation.config import validate_eval_config
from byol_flax.models.encoders import is_vit

MODULES = sorted(p.stem for p in (Path(__file__).parents[1] / "byol_flax" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))  # common: what the modules share


@pytest.mark.parametrize("name", MODULES)
def test_docstring_starts_with_the_launch_command(name):
    module = importlib.import_module(f"byol_flax.configs.{name}")
    first = module.__doc__.splitlines()[0]
    assert first.startswith("python -m") and re.search(rf"--config={name}[: ]", first)


@pytest.mark.parametrize("name", MODULES)
def test_configs_validate(name):
    config = importlib.import_module(f"byol_flax.configs.{name}").get_config()
    config.data.dir = config.data.dir or "/some/data"
    # eval_* modules are evaluation configs, with their own schema.
    validate = validate_eval_config if name.startswith("eval_") else validate_config
    validate(config, num_devices=8)


def test_imagenet_is_appendix_j1():
    c = byol_imagenet.get_config()
    assert (c.training.epochs, c.training.batch_size, c.training.warmup_epochs) == (1000, 4096, 10)
    assert (c.optimizer.base_learning_rate, c.optimizer.weight_decay) == (0.2, 1.5e-6)
    assert (c.optimizer.trust_coefficient, c.optimizer.momentum) == (1e-3, 0.9)
    assert c.target.base_ema == 0.996 and c.seed == 1337
    assert (c.model.batchnorm.decay, c.model.batchnorm.eps) == (0.9, 1e-5)
    assert (c.model.projector.hidden_size, c.model.projector.output_size) == (4096, 256)
    assert c.model.encoder.name == "resnet50" and c.model.encoder.width_multiplier == 1
    assert c.training.num_train_examples == 1_281_167


def test_appendix_h_and_section_5_variants():
    h = importlib.import_module("byol_flax.configs.byol_imagenet_bs512").get_config()
    assert (h.training.batch_size, h.optimizer.base_learning_rate, h.target.base_ema) == (
        512, 0.4, 0.9995)
    g = importlib.import_module("byol_flax.configs.byol_imagenet_300ep").get_config()
    assert (g.training.epochs, g.optimizer.base_learning_rate, g.optimizer.weight_decay,
            g.target.base_ema) == (300, 0.3, 1e-6, 0.99)


@pytest.mark.parametrize("arg", byol_imagenet.TABLE_9_ENCODERS)
def test_every_table_9_encoder_is_selectable(arg):
    c = byol_imagenet.get_config(arg)
    depth, width = arg[1:].split("x")
    assert (c.model.encoder.name == f"resnet{depth}"
            and c.model.encoder.width_multiplier == int(width))


def test_bad_argument_and_typo_key():
    with pytest.raises(ValueError, match="'resnet50'.*r50x1"):
        byol_imagenet.get_config("resnet50")
    with pytest.raises(AttributeError):
        byol_imagenet.get_config().training.batchsize = 512  # locked: no new keys
    c = byol_imagenet.get_config()
    c.data.dir = "/data"
    with pytest.raises(ConfigError, match="training.batch_size=4096 must be divisible by the 3"):
        validate_config(c, num_devices=3)


@pytest.mark.parametrize("arg,accumulation", [
    ("r50x1,slice=v3-512", 1),  # the paper: 4096 over 512 cores, 8 per core
    ("r50x1,slice=v4-64", 1),  # 32 devices x 128
    ("r50x1,slice=v4-8", 8),  # 4 devices: 4096 = 8 micro-batches of 512 (128 per device)
    ("r50x1,slice=v3-8,max_per_device=64", 8),
])
def test_slice_plans_split_the_paper_batch(arg, accumulation):
    c = byol_imagenet.get_config(arg)
    assert c.training.batch_size == 4096 and c.training.accumulation_steps == accumulation
    c.data.dir = "/data"
    slice_devices = {"v3-512": 512, "v4-64": 32, "v4-8": 4, "v3-8": 8}[arg.split("slice=")[1]
                                                                     .split(",")[0]]
    validate_config(c, num_devices=slice_devices)


def test_appendix_h_slice_plan_uses_its_own_batch():
    h = importlib.import_module("byol_flax.configs.byol_imagenet_bs512").get_config(
        "r50x1,slice=v4-8")
    assert (h.training.batch_size, h.training.accumulation_steps) == (512, 1)  # 128 per device
    with pytest.raises(ValueError, match=r"unknown option 'slices'; known: encoder, slice, "
                                         r"max_per_device, smoke"):
        byol_imagenet.get_config("r50x1,slices=v4-8")


def test_digits_recipes_differ_from_table_6_only_where_documented():
    from byol_flax.configs import digits_cpu
    from byol_flax.data.augment import default_augment_config

    paper = digits_cpu.get_config("data=/d,augment=paper")
    assert paper.data.dir == "/d" and digits_cpu.get_config("/d").data.dir == "/d"
    table_6 = default_augment_config()
    assert paper.augment.view1.to_dict() == table_6.view1.to_dict()
    assert paper.augment.view2.to_dict() == table_6.view2.to_dict()
    assert paper.augment.crop_area_min == 0.08
    for recipe in ("small_image", "digits"):
        small = digits_cpu.get_config(f"data=/d,augment={recipe}")
        assert small.augment.crop_area_min == 0.25
        assert small.augment.view1.flip_prob == small.augment.view2.flip_prob == 0.0
        assert small.augment.view2.solarize_prob == 0.2 and small.augment.view1.blur_prob == 1.0
    # digits: Table 6's blur sigma range [0.1, 2.0] (pixels of a 224-px crop) scaled to 16 px.
    default = digits_cpu.get_config("/d")
    assert default.augment.view1.blur_sigma_max == pytest.approx(2.0 * 16 / 224)
    assert default.augment.view2.blur_sigma_min == pytest.approx(0.1 * 16 / 224)
    # The default differs from paper only in the augmentations.
    for section in ("model", "optimizer", "target", "training", "data"):
        assert default[section].to_dict() == paper[section].to_dict(), section
    with pytest.raises(ValueError, match=r"augment='strong' is not one of \['digits', 'paper', "):
        digits_cpu.get_config("data=/d,augment=strong")


@pytest.mark.parametrize("chosen, arg", [("CHOSEN", "/d"), ("VIT_CHOSEN", "/d,augment=vit")])
def test_digits_recipes_are_the_points_the_calibration_sweep_chose(chosen, arg):
    """docs/demo_calibration.md's chosen points (the default recipe's and the ViT's), as
    benchmarks/demo_calibration.py defines them."""
    from benchmarks import demo_calibration as calibration
    from byol_flax.configs import digits_cpu

    recipe, overrides = calibration.POINTS[getattr(calibration, chosen)]
    swept = digits_cpu.get_config(f"data=/d,augment={recipe}")
    swept.update_from_flattened_dict(overrides)
    assert digits_cpu.DEFAULT_RECIPE == "digits"
    chosen = digits_cpu.get_config(arg)
    got, expected = _flatten(chosen.to_dict()), _flatten(swept.to_dict())
    assert got.keys() == expected.keys()
    for key in got:
        if isinstance(expected[key], float):
            assert got[key] == pytest.approx(expected[key], rel=1e-12), key
        else:
            assert got[key] == expected[key], key


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

def test_parse_arg_types_values_by_their_defaults_and_fills_the_positional_key():
    options = common.parse_arg("r101x2,slice=v4-8,max_per_device=64,smoke=True",
                               positional="encoder", encoder="r50x1", slice="",
                               max_per_device=128, epochs=100.0)
    assert options.to_dict() == {"encoder": "r101x2", "slice": "v4-8", "max_per_device": 64,
                                 "epochs": 100.0, "smoke": True}
    assert common.parse_arg("epochs=5,smoke=false", epochs=1.0).to_dict() == {
        "epochs": 5.0, "smoke": False}
    assert common.parse_arg(None, positional="data", data="d").to_dict() == {
        "data": "d", "smoke": False}


@pytest.mark.parametrize("arg, message", [
    ("size=big", r"config argument 'size=big': size='big' is not of type int"),
    ("smoke=maybe", r"smoke='maybe' is not of type bool"),
    ("sise=3", r"unknown option 'sise'; known: data, size, mode, smoke"),
    ("/d,/e", r"'/e' is not key=value; keys: data, size, mode, smoke"),
    ("mode=slow", r"mode='slow' is not one of \['fast', 'exact'\]"),
])
def test_parse_arg_refuses_bad_input_in_one_line_naming_it(arg, message):
    with pytest.raises(ValueError, match=message):
        common.parse_arg(arg, positional="data", data="", size=96, mode="fast",
                         choices={"mode": ("fast", "exact")})


@pytest.mark.parametrize("name", MODULES)
def test_every_module_shrinks_to_smoke_size_last(name):
    """``smoke=True`` is the full config with the smoke switch applied on top (derived modules
    included: their own schedule does not undo it), valid, and seconds-long."""
    module = importlib.import_module(f"byol_flax.configs.{name}")
    small, full = module.get_config("smoke=True"), module.get_config()
    assert small.to_dict() == common.smoke(full).to_dict()
    small.data.dir = small.data.dir or "/some/data"
    if name.startswith("eval_"):
        validate_eval_config(small, num_devices=8)
        assert (small.data.image_size, small.data.max_train_examples) == (8, 256)
        return
    validate_config(small, num_devices=8)
    assert training_steps(small, 1_000_000) == (8, 4)  # batch 32 on 128-example "epochs"
    tiny = "vit_micro" if is_vit(full.model.encoder.name) else "resnet_tiny"
    assert (small.data.image_size, small.model.encoder.name) == (8, tiny)


def test_smoke_keeps_a_cpu_sized_model_and_replaces_a_full_size_one():
    from byol_flax.configs import digits_cpu

    smoke, full = digits_cpu.get_config("smoke=True").model, digits_cpu.get_config().model
    assert (smoke.encoder.image_size, full.encoder.image_size) == (8, 16)  # data.image_size's
    full.encoder.image_size = 8
    assert smoke == full
    tiny = byol_imagenet.get_config("r200x2,smoke=True").model
    assert (tiny.encoder.name, tiny.encoder.stem, tiny.encoder.width_multiplier) == (
        "resnet_tiny", "small", 2)
    assert (tiny.projector.hidden_size, tiny.projector.output_size,
            tiny.predictor.hidden_size) == (64, 32, 64)
