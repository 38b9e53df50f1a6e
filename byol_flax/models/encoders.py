"""The encoder registry: every encoder f a config can name, and the one function that builds it.

A new encoder is one constructor plus one ``@ENCODERS.register("name")``; ``config.model.encoder``
then selects it by name (``byol_flax/runtime/registry.py``). Registered here: the ResNets of
Table 9 (and ``resnet_tiny`` for CPUs) and the Vision Transformers of MoCo v3 / timm (and
``vit_micro`` for CPUs).
"""

import functools
import inspect
from typing import Any

from flax import nnx

from byol_flax.models.resnet import BatchNormConfig, ResNet, Stem
from byol_flax.models.vit import VIT_SIZES, VisionTransformer
from byol_flax.runtime.registry import Registry

ENCODERS: Registry = Registry("encoder")
WIDTH_MULTIPLIERS = (1, 2, 3, 4)  # Table 9's widths

_BASIC_CHANNELS = (64, 128, 256, 512)
_BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)
_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}

for _depth, (_blocks, _bottleneck) in _DEPTHS.items():
    ENCODERS.register(f"resnet{_depth}")(functools.partial(
        ResNet, blocks_per_stage=_blocks, bottleneck=_bottleneck,
        stage_channels=_BOTTLENECK_CHANNELS if _bottleneck else _BASIC_CHANNELS))

# A four-stage basic-block net with one block per stage: the same code path as the real
# encoders at a size that compiles in seconds on a CPU (tests, smoke runs).
ENCODERS.register("resnet_tiny")(functools.partial(
    ResNet, blocks_per_stage=(1, 1, 1, 1), stage_channels=(8, 16, 32, 64), bottleneck=False,
    stem_channels=8))

for _name, (_width, _depth, _heads) in VIT_SIZES.items():
    ENCODERS.register(_name)(functools.partial(VisionTransformer, width=_width, depth=_depth,
                                               heads=_heads))

# Options of config.model.encoder that only some encoders take, with the value that means "not
# used": an encoder that does not take one gets it only at that value (else: an error naming it).
ENCODER_OPTIONS = {
    "conv_implementation": "auto",  # ResNet (byol_flax.models.conv)
    "zero_init_residual": False,  # ResNet
    "patch_size": 0,  # ViT: 0 = by stem (byol_flax.models.vit)
    "num_heads": 0,  # ViT: 0 = the size's
    "pooling": "token",  # ViT
    "position_embedding": "sincos",  # ViT
    "freeze_patch_projection": False,  # ViT
    "final_norm": "layernorm",  # ViT
}
# What an encoder may need to know of its input, handed to those that take it.
ENCODER_CONTEXT = ("image_size",)


def is_vit(name: str) -> bool:
    """Whether ``name`` is a registered Vision Transformer (False for unknown names)."""
    if name not in ENCODERS:
        return False
    constructor = ENCODERS.get(name)
    target = constructor.func if isinstance(constructor, functools.partial) else constructor
    return inspect.isclass(target) and issubclass(target, VisionTransformer)


def build_encoder(name: str, *, width_multiplier: int = 1, stem: Stem = "imagenet",
                  bn: BatchNormConfig = BatchNormConfig(), dtype: Any = None, rngs: nnx.Rngs,
                  **options: Any) -> nnx.Module:
    """Builds the encoder registered as ``name`` (``resnet50``, ``vit_small``, ...).

    ``options``: those of :data:`ENCODER_OPTIONS` and :data:`ENCODER_CONTEXT`. An encoder
    receives an option if its constructor names it, or takes ``**options`` and the value is not
    the "not used" one; a used value for an encoder that cannot take it is an error (a user's
    encoder without ``zero_init_residual``, a ViT option on a ResNet). Context (the image
    size) reaches only constructors that name it.
    """
    if width_multiplier not in WIDTH_MULTIPLIERS:
        raise ValueError(f"encoder width_multiplier must be one of {WIDTH_MULTIPLIERS}, got "
                         f"{width_multiplier!r}")
    unknown = set(options) - set(ENCODER_OPTIONS) - set(ENCODER_CONTEXT)
    if unknown:
        raise TypeError(f"build_encoder: unknown options {sorted(unknown)}")
    constructor = ENCODERS.get(name)
    target = constructor.func if isinstance(constructor, functools.partial) else constructor
    accepted = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    passed = {}
    for key, value in options.items():
        used = key in ENCODER_OPTIONS and value != ENCODER_OPTIONS[key]
        if key in accepted or (takes_any and used):
            passed[key] = value
        elif used:
            raise ValueError(f"encoder {name!r} does not take {key} (got {value!r}); leave it at "
                             f"{ENCODER_OPTIONS[key]!r}")
    return constructor(width_multiplier=width_multiplier, stem=stem, bn=bn, dtype=dtype,
                       rngs=rngs, **passed)
