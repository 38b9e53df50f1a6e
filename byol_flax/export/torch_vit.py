"""The loader of a Vision Transformer's ``encoder.safetensors`` (``python -m byol_flax.export
--format=torch`` on a ViT, :mod:`byol_flax.export.timm_vit`) as timm's ``VisionTransformer``.

The file holds timm's state-dict keys without ``head.*`` and, in its ``byol_flax`` metadata, the
keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` (``num_classes=0``): the
module returns the representation y (B, D) of NCHW images normalised as in pre-training (ImageNet
mean and standard deviation of [0, 1] RGB). Without this module::

    model = VisionTransformer(**architecture)
    model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)

This module imports only torch, timm, safetensors and :mod:`byol_flax.export.torch_resnet` (torch
and safetensors alone; no JAX), so the two can be copied into a PyTorch project. Loading checks the
file first, as :mod:`byol_flax.export.torch_resnet` does: only known constructor arguments within
:data:`LIMITS`, the module built on PyTorch's ``meta`` device (no memory) and its shapes compared
with the file's, every tensor's sha256 compared with the one recorded at export time; each failure
is one :class:`ExportFileError` line naming the file and the key.
"""

import math
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from byol_flax.export.torch_resnet import (
    CHECKSUMS_KEY,
    FORMAT_VERSION,
    ExportFileError,
    read_metadata_object,
    tensor_sha256,
    weights_file,
)

LAYOUT = "timm"  # as byol_flax.export.timm_vit writes it (tests/test_timm_vit.py checks)
# The constructor arguments a file may set, with their bounds (ViT-L/14 at 518 px fits);
# "parameters" is byol_flax.export.encoder.MAX_PARAMETERS.
INTEGER_LIMITS = {"img_size": 4096, "patch_size": 64, "in_chans": 16, "embed_dim": 8192,
                  "depth": 128, "num_heads": 256}
GLOBAL_POOLS = ("token", "avg")
LIMITS = {"parameters": 600_000_000}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's ``byol_flax`` metadata, checked to describe a timm ViT within the limits."""
    path = os.fspath(path)
    meta = read_metadata_object(path)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("layout") != LAYOUT:
        raise ExportFileError(f"{path}: not a format {FORMAT_VERSION} ViT export (layout "
                              f"{LAYOUT!r}): a ResNet export loads with torch_resnet")
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise ExportFileError(f"{path}: metadata 'architecture' is not a mapping")
    allowed = {*INTEGER_LIMITS, "mlp_ratio", "global_pool", "num_classes", "class_token"}
    if set(arch) - allowed:
        raise ExportFileError(f"{path}: metadata architecture.{sorted(set(arch) - allowed)[0]} "
                              "is not an argument this loader passes")
    for key, limit in INTEGER_LIMITS.items():
        value = arch.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ExportFileError(f"{path}: metadata architecture.{key} must be an integer in "
                                  f"[1, {limit}]")
    if arch.get("global_pool") not in GLOBAL_POOLS or arch.get("num_classes") != 0 \
            or arch.get("class_token") is not True or not isinstance(arch.get("mlp_ratio"),
                                                                     (int, float)) \
            or not 0 < arch["mlp_ratio"] <= 16:
        raise ExportFileError(f"{path}: metadata architecture must have global_pool in "
                              f"{GLOBAL_POOLS}, num_classes 0, class_token true, mlp_ratio in "
                              "(0, 16]")
    if not isinstance(meta.get(CHECKSUMS_KEY), dict):
        raise ExportFileError(f"{path}: metadata holds no per-tensor checksums")
    return meta


def build_timm_model(path: str | os.PathLike) -> VisionTransformer:
    """A ViT ``encoder.safetensors`` (or the export directory holding it) as timm's
    ``VisionTransformer`` in eval mode: NCHW normalised float32 images -> representation."""
    path = weights_file(path)
    meta = read_metadata(path)
    arch = meta["architecture"]
    with torch.device("meta"):  # shapes only: nothing allocated yet
        shapes = {key: tuple(value.shape)
                  for key, value in VisionTransformer(**arch).state_dict().items()}
    parameters = sum(math.prod(shape) for shape in shapes.values())
    if parameters > LIMITS["parameters"]:
        raise ExportFileError(f"{path}: the architecture has {parameters:,} parameters, more "
                              f"than the {LIMITS['parameters']:,} this loader accepts")
    with safe_open(path, framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    for key in sorted(set(shapes) | set(stored)):
        if shapes.get(key) != stored.get(key):
            raise ExportFileError(f"{path}: tensor {key} is {stored.get(key)} in the file, the "
                                  f"recorded architecture needs {shapes.get(key)}")
    tensors = load_file(path)
    for key, tensor in tensors.items():
        if meta[CHECKSUMS_KEY].get(key) != tensor_sha256(tensor):
            raise ExportFileError(f"{path} is damaged: tensor {key} differs from the checksum "
                                  "recorded at export time")
    model = VisionTransformer(**arch)
    model.load_state_dict(tensors, strict=True)
    return model.eval()
