"""The PyTorch export: our encoder's arrays under torchvision's ResNet state-dict keys, in one
``encoder.safetensors`` (``python -m byol_flax.export --format=torch``); a Vision Transformer is
written under timm's ``VisionTransformer`` keys instead (:mod:`byol_flax.export.timm_vit`, same
file name and metadata conventions, ``"layout": "timm"`` in the metadata).

Written with NumPy alone (no torch here): convolution kernels HWIO -> OIHW, BatchNorm
``scale``/``bias``/``mean``/``var`` -> ``weight``/``bias``/``running_mean``/``running_var`` plus
``num_batches_tracked``, so that ``load_state_dict(strict=True)`` accepts the file on
:class:`byol_flax.export.torch_resnet.ResNet`, and on a torchvision ResNet of the same shape
once its ``fc`` is ``nn.Identity()``. The file's metadata holds the architecture as JSON, which
:func:`byol_flax.export.torch_resnet.load_torch_encoder` rebuilds the module from.

Shapes torchvision has: the bottleneck nets (``resnet50``, ``resnet101``, ``resnet152``) at width
1 with the ImageNet stem; its ``resnet18``/``resnet34`` lack the projection shortcut our first
stage has (``layer1.0.downsample``). Even where the keys fit, torchvision pads strided layers
differently from ours (see :mod:`byol_flax.export.torch_resnet`); ``docs/pretrained_weights.md``
measures how much that changes the features.
"""

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import save_file

from byol_flax.export import timm_vit
from byol_flax.export.encoder import write_atomically
from byol_flax.export.torch_common import (
    FORMAT_VERSION,
    INPUT_NOTE,
    METADATA_KEY,
    WEIGHTS_NAME,
    TorchExportError,
)
from byol_flax.models.resnet import ResNet
from byol_flax.models.vit import VisionTransformer
from byol_flax.weights.encoder import PretrainedEncoder, array_checksums

PADDING_NOTE = ("XLA SAME: per side of n pixels, total = max((ceil(n/s)-1)*s + k - n, 0), "
                "total//2 before and the rest after (max-pool pads with -inf); torchvision pads "
                "k//2 (max-pool 1) on both sides, which differs for strided layers on even "
                "sizes: load with byol_flax.export.torch_resnet.load_torch_encoder for our "
                "features")
# torchvision's bottleneck ResNets: blocks per stage -> constructor name.
TORCHVISION_BOTTLENECK = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101",
                          (3, 8, 36, 3): "resnet152"}


def _norm_arrays(prefix: str, norm: nnx.BatchNorm) -> dict[str, np.ndarray]:
    return {f"{prefix}.weight": np.asarray(norm.scale[...], np.float32),
            f"{prefix}.bias": np.asarray(norm.bias[...], np.float32),
            f"{prefix}.running_mean": np.asarray(norm.mean[...], np.float32),
            f"{prefix}.running_var": np.asarray(norm.var[...], np.float32),
            f"{prefix}.num_batches_tracked": np.zeros((), np.int64)}


def _conv_array(conv: nnx.Conv) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(conv.kernel[...], np.float32).transpose(3, 2, 0, 1))


def _stages(encoder: ResNet, name: str) -> list[list[Any]]:
    """The blocks grouped by stage: each stage starts at a block with a projection shortcut."""
    stages: list[list[Any]] = []
    for index, block in enumerate(encoder.blocks):
        if block.shortcut_conv is not None:
            stages.append([])
        elif not stages:
            raise TorchExportError(f"encoder {name!r}: block 0 has no projection shortcut, which "
                                   "the torchvision layout (downsample on every stage's first "
                                   "block) cannot express")
        stages[-1].append(block)
    return stages


def architecture(pretrained: PretrainedEncoder) -> dict[str, Any]:
    """What the safetensors metadata records: the constructor arguments of
    :class:`byol_flax.export.torch_resnet.ResNet` (under ``"architecture"``) and notes."""
    encoder, config = pretrained.encoder, pretrained.model_config.get("encoder", {})
    if isinstance(encoder, VisionTransformer):
        return timm_vit.architecture(pretrained)
    name = config.get("name", type(encoder).__name__)
    if not isinstance(encoder, ResNet):
        raise TorchExportError(f"encoder {name!r} is a {type(encoder).__name__}, not "
                               "byol_flax.models.resnet.ResNet or byol_flax.models.vit."
                               "VisionTransformer: only those export to torch")
    stages = _stages(encoder, name)
    bottleneck = len(stages[0][0].convs) == 3
    multiplier = int(config.get("width_multiplier", 1))
    stem_width = encoder.stem_conv.out_features
    widths = [stage[0].shortcut_conv.out_features for stage in stages]
    if any(w % multiplier for w in [stem_width, *widths]):
        raise TorchExportError(f"encoder {name!r}: channels {[stem_width, *widths]} are not "
                               f"multiples of width_multiplier={multiplier}")
    norm = encoder.stem_norm  # every BatchNorm of a ResNet shares eps and decay
    arch = {
        "stem": encoder.stem,
        "stem_channels": stem_width // multiplier,
        "in_channels": encoder.stem_conv.in_features,
        "blocks_per_stage": [len(stage) for stage in stages],
        "stage_channels": [w // multiplier for w in widths],
        "stage_strides": [int(np.ravel(stage[0].shortcut_conv.strides)[0]) for stage in stages],
        "bottleneck": bottleneck,
        "width_multiplier": multiplier,
        "batchnorm": {"eps": float(norm.epsilon), "decay": float(norm.momentum)},
    }
    stock = TORCHVISION_BOTTLENECK.get(tuple(arch["blocks_per_stage"])) if (
        bottleneck and encoder.stem == "imagenet" and multiplier == 1
        and arch["stem_channels"] == 64 and arch["in_channels"] == 3
        and arch["stage_channels"] == [256, 512, 1024, 2048]
        and arch["stage_strides"] == [1, 2, 2, 2]
        and math.isclose(arch["batchnorm"]["eps"], 1e-5)) else None
    return {"format_version": FORMAT_VERSION, "encoder": config, "architecture": arch,
            "representation_size": encoder.num_features,
            "torchvision_equivalent": stock, "padding": PADDING_NOTE, "input": INPUT_NOTE}


def torch_arrays(pretrained: PretrainedEncoder) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(torchvision-keyed arrays, architecture) of the encoder; no ``fc.*``. A ViT's are
    timm-keyed (:func:`byol_flax.export.timm_vit.timm_arrays`)."""
    if isinstance(pretrained.encoder, VisionTransformer):
        return timm_vit.timm_arrays(pretrained)
    arch = architecture(pretrained)
    encoder = pretrained.encoder
    arrays = {"conv1.weight": _conv_array(encoder.stem_conv),
              **_norm_arrays("bn1", encoder.stem_norm)}
    for stage, blocks in enumerate(_stages(encoder, "")):
        for index, block in enumerate(blocks):
            prefix = f"layer{stage + 1}.{index}"
            for number, (conv, norm) in enumerate(zip(block.convs, block.norms), start=1):
                arrays[f"{prefix}.conv{number}.weight"] = _conv_array(conv)
                arrays.update(_norm_arrays(f"{prefix}.bn{number}", norm))
            if block.shortcut_conv is not None:
                arrays[f"{prefix}.downsample.0.weight"] = _conv_array(block.shortcut_conv)
                arrays.update(_norm_arrays(f"{prefix}.downsample.1", block.shortcut_norm))
    return arrays, arch


def save_torch_weights(pretrained: PretrainedEncoder, path: epath.PathLike) -> dict[str, Any]:
    """Writes the encoder to the safetensors file ``path``; returns the architecture recorded."""
    arrays, arch = torch_arrays(pretrained)
    arch["checksums"] = array_checksums(arrays)  # the keys are already flat
    save_file(arrays, str(path), metadata={METADATA_KEY: json.dumps(arch, sort_keys=True),
                                           "format": "pt"})
    return arch


LOADER = ("`from byol_flax.export.torch_resnet import load_torch_encoder; "
          "model = load_torch_encoder(DIR)` (eval mode; NCHW normalised images -> "
          f"representation); `{WEIGHTS_NAME}` has torchvision's ResNet keys without `fc.*`")


def loader_text(export: dict[str, Any]) -> str:
    """How to load the export whose metadata is ``export`` (the model card's line)."""
    if export.get("layout") == "timm":
        return (f"{timm_vit.LOADER}; `{WEIGHTS_NAME}` has timm's VisionTransformer keys without "
                "`head.*`")
    return LOADER


def export_torch(pretrained: PretrainedEncoder, out_dir: epath.PathLike,
                 write_extra: Callable[[epath.Path], None] | None = None, *,
                 inputs: Sequence[str] = ()) -> epath.Path:
    """Writes ``encoder.safetensors`` (and whatever ``write_extra(directory)`` adds: the model
    card) to ``out_dir``, atomically (a failed export leaves the previous one intact)."""
    architecture(pretrained)  # fails before anything is written

    def write(staging: epath.Path) -> None:
        save_torch_weights(pretrained, staging / WEIGHTS_NAME)
        if write_extra is not None:
            write_extra(staging)

    return write_atomically(out_dir, write, inputs=inputs)
