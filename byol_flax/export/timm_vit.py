"""The PyTorch export of a Vision Transformer: our encoder's arrays under timm's
``VisionTransformer`` state-dict keys, in one ``encoder.safetensors``
(``python -m byol_flax.export --format=torch`` on a ViT).

Our :class:`byol_flax.models.vit.VisionTransformer` is laid out as timm's, so the export is a
renaming plus the layout changes of PyTorch: Linear kernels (in, out) -> weights (out, in), the
patch projection (p * p * C, D) (a p x p / p convolution's HWIO kernel, flattened) -> the conv
weight (D, C, p, p), the class token (1, D) -> (1, 1, D), the position embedding (1 + T, D) ->
(1, 1 + T, D), LayerNorm ``scale`` -> ``weight``, our ``fc1``/``fc2`` -> ``mlp.fc1``/``mlp.fc2``,
the final LayerNorm -> ``norm`` (class-token pooling) or ``fc_norm`` (timm's ``global_pool='avg'``:
LayerNorm after the mean). No ``head.*``: the model is built with ``num_classes=0`` and returns
the representation.

Written with NumPy and ``safetensors.numpy`` alone (no torch here). The metadata (key
``byol_flax``, JSON) holds the keyword arguments of ``timm.models.vision_transformer.
VisionTransformer`` under ``"architecture"``, the stock timm name of that shape (``"timm_model"``,
None when not stock) and a sha256 per tensor, so anyone can load it without byol_flax::

    import json, safetensors, safetensors.torch, timm
    arch = json.loads(safetensors.safe_open(FILE, "pt").metadata()["byol_flax"])["architecture"]
    model = timm.models.vision_transformer.VisionTransformer(**arch)
    model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)

:func:`byol_flax.export.torch_vit.build_timm_model` does that and verifies the checksums.
:mod:`byol_flax.init_from` reads the same layout back (any timm ViT checkpoint of the config's
shape, such as the Hugging Face hub's ``model.safetensors``).
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from byol_flax.config import flatten_dotted
from byol_flax.export.torch_common import FORMAT_VERSION, INPUT_NOTE, TorchExportError
from byol_flax.models.vit import MLP_RATIO, VisionTransformer
from byol_flax.weights.encoder import PretrainedEncoder

LAYOUT = "timm"  # the metadata's "layout": what tells a ViT export from a ResNet one
# The final LayerNorm's timm name by our pooling (timm's global_pool by our pooling).
NORM_BY_POOLING = {"token": "norm", "mean": "fc_norm"}
GLOBAL_POOL_BY_POOLING = {"token": "token", "mean": "avg"}
# timm's stock ViTs: (embed_dim, depth, num_heads) -> size name; the names below are those timm
# 1.0 registers for 3-channel images (tests/test_timm_vit.py checks timm lists them).
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
              (1024, 24, 16): "large"}
TIMM_STOCK_MODELS = frozenset({
    "vit_tiny_patch16_224", "vit_tiny_patch16_384",
    "vit_small_patch8_224", "vit_small_patch16_224", "vit_small_patch32_224",
    "vit_small_patch16_384", "vit_small_patch32_384",
    "vit_base_patch8_224", "vit_base_patch16_224", "vit_base_patch32_224",
    "vit_base_patch16_384", "vit_base_patch32_384",
    "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch32_224",
    "vit_large_patch16_384", "vit_large_patch32_384",
})
LOADER = ("`timm.models.vision_transformer.VisionTransformer(**arch)` with `arch` the "
          "`architecture` of the file's `byol_flax` metadata (or `timm.create_model(timm_model, "
          "num_classes=0, global_pool=arch['global_pool'])` when `timm_model` is set), then "
          "`model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)`; "
          "`byol_flax.export.torch_vit.build_timm_model(DIR)` does both and verifies the "
          "checksums (eval mode; NCHW normalised images -> representation)")


class TimmExportError(TorchExportError):
    """The encoder is not a ViT that timm's layout expresses (a bug: every one of ours is)."""


# Our array -> timm's tensor, by kind. Written with array methods only, so that the same
# functions give the shapes of shape-only arrays (jax.eval_shape) for the import's checks.
def _patch_to_timm(kernel: Any, patch: int) -> Any:
    """(p * p * C, D) flattened (row, col, channel) -> the conv weight (D, C, p, p)."""
    return kernel.reshape(patch, patch, -1, kernel.shape[-1]).transpose(3, 2, 0, 1)


def _patch_from_timm(weight: Any, patch: int) -> Any:
    del patch  # the weight's own shape says it
    return weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])


TO_TIMM: dict[str, Callable[[Any, int], Any]] = {
    "linear": lambda a, _: a.T, "token": lambda a, _: a[None], "vector": lambda a, _: a,
    "patch": _patch_to_timm}
FROM_TIMM: dict[str, Callable[[Any, int], Any]] = {
    "linear": lambda a, _: a.T, "token": lambda a, _: a[0], "vector": lambda a, _: a,
    "patch": _patch_from_timm}
_BLOCK_KEYS = {"norm1.scale": ("norm1.weight", "vector"), "norm1.bias": ("norm1.bias", "vector"),
               "norm2.scale": ("norm2.weight", "vector"), "norm2.bias": ("norm2.bias", "vector"),
               "attn.qkv.kernel": ("attn.qkv.weight", "linear"),
               "attn.qkv.bias": ("attn.qkv.bias", "vector"),
               "attn.proj.kernel": ("attn.proj.weight", "linear"),
               "attn.proj.bias": ("attn.proj.bias", "vector"),
               "fc1.kernel": ("mlp.fc1.weight", "linear"), "fc1.bias": ("mlp.fc1.bias", "vector"),
               "fc2.kernel": ("mlp.fc2.weight", "linear"), "fc2.bias": ("mlp.fc2.bias", "vector")}


def timm_key(path: str, pooling: str) -> tuple[str, str]:
    """(timm state-dict key, kind of layout change) of our array at dotted ``path``; an array
    this mapping does not know is an error (a new one must be given its timm name here)."""
    top = {"patch_kernel": ("patch_embed.proj.weight", "patch"),
           "patch_bias": ("patch_embed.proj.bias", "vector"),
           "cls_token": ("cls_token", "token"), "position_embedding": ("pos_embed", "token"),
           "norm.scale": (f"{NORM_BY_POOLING[pooling]}.weight", "vector"),
           "norm.bias": (f"{NORM_BY_POOLING[pooling]}.bias", "vector")}
    if path in top:
        return top[path]
    parts = path.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _BLOCK_KEYS:
        key, kind = _BLOCK_KEYS[parts[2]]
        return f"blocks.{parts[1]}.{key}", kind
    raise TimmExportError(f"ViT array {path} has no timm name (byol_flax.export.timm_vit)")


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path)


def _vit(pretrained_or_encoder: Any) -> VisionTransformer:
    encoder = getattr(pretrained_or_encoder, "encoder", pretrained_or_encoder)
    if not isinstance(encoder, VisionTransformer):
        raise TimmExportError(f"a {type(encoder).__name__} is not a "
                              "byol_flax.models.vit.VisionTransformer")
    if encoder.final_norm != "layernorm":
        raise TimmExportError(f"model.encoder.final_norm={encoder.final_norm!r}: timm's "
                              "VisionTransformer ends in a LayerNorm; only that ViT has a timm "
                              "layout (the default --format=byol_flax exports it)")
    return encoder


def timm_architecture(encoder: VisionTransformer) -> dict[str, Any]:
    """The keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` that build
    ``encoder``'s twin (without classifier: ``num_classes=0``)."""
    kernel = nnx.state(encoder)["patch_kernel"]
    channels = kernel.shape[0] // encoder.patch_size ** 2
    return {"img_size": encoder.image_size, "patch_size": encoder.patch_size,
            "in_chans": channels, "embed_dim": encoder.num_features, "depth": encoder.depth,
            "num_heads": encoder.num_heads, "mlp_ratio": float(MLP_RATIO),
            "global_pool": GLOBAL_POOL_BY_POOLING[encoder.pooling], "num_classes": 0,
            "class_token": True}


def stock_timm_model(arch: dict[str, Any]) -> str | None:
    """timm's registered name of the shape ``arch`` describes (``vit_small_patch16_224``), or
    None; the pooling is not part of it (``create_model(..., global_pool=...)`` sets it)."""
    size = TIMM_SIZES.get((arch["embed_dim"], arch["depth"], arch["num_heads"]))
    name = f"vit_{size}_patch{arch['patch_size']}_{arch['img_size']}"
    return name if size and arch["in_chans"] == 3 and name in TIMM_STOCK_MODELS else None


def architecture(pretrained: PretrainedEncoder) -> dict[str, Any]:
    """What the safetensors metadata records (as :func:`byol_flax.export.torch_format.
    architecture` does for ResNets): timm's constructor arguments under ``"architecture"``, the
    stock timm name, notes."""
    encoder = _vit(pretrained)
    arch = timm_architecture(encoder)
    return {"format_version": FORMAT_VERSION, "layout": LAYOUT,
            "encoder": pretrained.model_config.get("encoder", {}), "architecture": arch,
            "timm_model": stock_timm_model(arch), "representation_size": encoder.num_features,
            "position_embedding": encoder.position_embedding_kind, "input": INPUT_NOTE}


def timm_arrays(pretrained: PretrainedEncoder) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(timm-keyed float32 arrays, architecture) of the ViT encoder; no ``head.*``."""
    meta = architecture(pretrained)
    encoder = _vit(pretrained)
    arrays = {}
    for path, value in flatten_dotted(nnx.to_pure_dict(nnx.state(encoder))).items():
        key, kind = timm_key(path, encoder.pooling)
        arrays[key] = np.ascontiguousarray(
            TO_TIMM[kind](np.asarray(value, np.float32), encoder.patch_size))
    return arrays, meta


def timm_shapes(encoder: VisionTransformer) -> dict[str, tuple[int, ...]]:
    """{timm key: shape} of what :func:`timm_arrays` writes for ``encoder`` (which may be
    shape-only, from ``nnx.eval_shape``): the import's check of a file, nothing allocated."""
    encoder = _vit(encoder)
    shapes = {}
    for path, value in flatten_dotted(nnx.to_pure_dict(nnx.state(encoder))).items():
        key, kind = timm_key(path, encoder.pooling)
        abstract = jax.ShapeDtypeStruct(value.shape, np.float32)
        shapes[key] = tuple(jax.eval_shape(lambda a, k=kind: TO_TIMM[k](a, encoder.patch_size),
                                           abstract).shape)
    return shapes


def arrays_from_timm(encoder: VisionTransformer, tensors: dict[str, np.ndarray]
                     ) -> dict[str, Any]:
    """``tensors`` (timm's keys; extra keys such as ``head.*`` ignored) as a pure dict shaped
    like ``encoder``'s state, float32: what :func:`byol_flax.export.encoder.set_arrays` takes.
    The caller has checked the shapes (:func:`timm_shapes`)."""
    encoder = _vit(encoder)

    def convert(path: tuple[Any, ...], _: Any) -> np.ndarray:
        key, kind = timm_key(_dotted(path), encoder.pooling)
        return np.ascontiguousarray(FROM_TIMM[kind](np.asarray(tensors[key], np.float32),
                                                    encoder.patch_size))

    return jax.tree_util.tree_map_with_path(convert, nnx.to_pure_dict(nnx.state(encoder)))
