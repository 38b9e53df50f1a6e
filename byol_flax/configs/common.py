"""What every experiment config module shares: its argument parser and the smoke-size switch.

``--config=NAME:ARG`` hands ``ARG`` to ``get_config``; :func:`parse_arg` turns it into typed
options (big_vision's convention): ``"r50x1,slice=v4-8"`` -> ``encoder="r50x1"``,
``slice="v4-8"``. Every module accepts ``smoke=True``, which ends ``get_config`` with
:func:`smoke`: the same code paths at sizes that run in seconds on a CPU. The demo's ``--smoke``,
the reliability suite and the tests use that one switch, adding only what is specific to them
(their step counts and cadences) as ordinary ``--config.KEY=VALUE`` overrides.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from byol_flax.errors import UserError
from byol_flax.models.encoders import is_vit

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

# A full-size model becomes this one under smoke (the tests' tiny model): resnet_tiny (vit_micro
# for a Vision Transformer) with the 32-px stem and small heads. A config already on the tiny
# encoder (the CPU configs) keeps its model, so the demo's smoke run trains the demo's network on
# less data.
SMOKE_MODEL = {"model.encoder.name": "resnet_tiny", "model.encoder.stem": "small",
               "model.projector.hidden_size": 64, "model.projector.output_size": 32,
               "model.predictor.hidden_size": 64}
SMOKE_VIT_ENCODER = "vit_micro"
# Pre-training: 8-px crops, batch 32, two "epochs" of 128 examples (8 steps, 4 of warm-up), every
# cadence (checkpoint, log, monitors) inside those steps, monitors on 256 examples.
SMOKE_PRETRAINING = {
    # float32: smoke runs are CPU runs, where bfloat16 is emulated (slower, not smaller).
    "model.compute_dtype": "float32",
    "data.image_size": 8, "data.worker_count": 0, "training.batch_size": 32,
    "training.num_train_examples": 128, "training.epochs": 2.0, "training.warmup_epochs": 1.0,
    "checkpoint.every_steps": 4, "logging.every_steps": 2, "monitor.every_steps": 4,
    "monitor.batch_size": 64, "monitor.max_train_examples": 256,
}
# Evaluation: 8-px images, 256 training examples, each protocol's sweep cut to a point or two.
SMOKE_EVALUATION = {
    "data.image_size": 8, "data.worker_count": 0, "data.max_train_examples": 256,
    "feature_batch_size": 64, "linear.epochs": 2.0, "linear.learning_rates": (0.4, 0.1),
    "linear.batch_size": 256, "semi_supervised.epochs": (1,),
    "semi_supervised.learning_rates": (0.05,), "semi_supervised.batch_size": 128,
    "transfer_linear.l2_count": 3, "transfer_finetune.steps": 4,
    "transfer_finetune.learning_rate_count": 1, "transfer_finetune.weight_decay_count": 1,
    "transfer_finetune.batch_size": 128,
}


class ConfigArgumentError(UserError, ValueError):
    """A config module's argument (``--config=NAME:ARG``) it cannot take: an unknown option, a
    value of the wrong type or outside its choices. A ``UserError``: the commands print it as one
    line naming the option (ml_collections and absl wrap it, see
    ``byol_flax.runtime.commands.run_command``)."""


def parse_arg(arg: str | None, *, positional: str | None = None,
              choices: Mapping[str, Sequence[Any]] | None = None,
              **defaults: Any) -> ml_collections.ConfigDict:
    """A config module's argument as typed options over ``defaults``.

    ``arg`` is ``key=value,...``, optionally led by a bare value for the ``positional`` key
    (``"r50x1,slice=v4-8"``, ``"data/digits"``). Each value takes the type of its default
    (bool: True/False, int, float, str); ``smoke`` (bool, default False) is always known.
    Unknown keys, values of the wrong type and values outside ``choices`` fail in one line
    naming them.
    """
    defaults = {**defaults, "smoke": False}
    options = dict(defaults)
    known = ", ".join(defaults)
    for index, part in enumerate(p for p in (arg or "").split(",") if p):
        key, sep, text = part.partition("=")
        if not sep:
            if index or positional is None:
                raise ConfigArgumentError(f"config argument {arg!r}: {part!r} is not "
                                          f"key=value; keys: {known}")
            key, text = positional, part
        if key not in defaults:
            raise ConfigArgumentError(f"config argument {arg!r}: unknown option {key!r}; "
                                      f"known: {known}")
        options[key] = _typed(arg, key, text, defaults[key])
    for key, allowed in (choices or {}).items():
        if options[key] not in allowed:
            raise ConfigArgumentError(f"config argument {arg!r}: {key}={options[key]!r} is "
                                      f"not one of {list(allowed)}")
    return ml_collections.ConfigDict(options)


def _typed(arg: str | None, key: str, text: str, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    else:
        return text
    raise ConfigArgumentError(f"config argument {arg!r}: {key}={text!r} is not of type "
                              f"{kind.__name__}")


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` (pre-training or evaluation) at smoke size, in place; returns it."""
    if "protocol" in config:  # the evaluation schema (byol_flax/evaluation/config.py)
        overrides = SMOKE_EVALUATION
    else:
        vit = is_vit(config.model.encoder.name)
        tiny_name = SMOKE_VIT_ENCODER if vit else SMOKE_MODEL["model.encoder.name"]
        model = {**SMOKE_MODEL, "model.encoder.name": tiny_name}
        if vit:  # the ViT's own size (heads, patch) by the tiny encoder's defaults
            model.update({"model.encoder.num_heads": 0, "model.encoder.patch_size": 0})
        tiny = config.model.encoder.name == tiny_name
        overrides = {**({} if tiny else model), **SMOKE_PRETRAINING}
    config.update_from_flattened_dict(overrides)
    return config


def finish(config: ml_collections.ConfigDict, options: ml_collections.ConfigDict
           ) -> ml_collections.ConfigDict:
    """The last line of every ``get_config``: applies ``smoke=True``."""
    return smoke(config) if options.smoke else config
