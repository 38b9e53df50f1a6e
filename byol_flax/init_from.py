"""Starting a new pre-training run from an export: ``config.model.init_from``.

The online encoder takes the export's arrays (weights and BatchNorm statistics), and so do the
projector and predictor when the export kept them and ``config.model.init_from_heads`` is set;
the target then becomes their exact copy, as at any step 0 (Appendix J.5), while the optimizer
state, the online classifier and the step start fresh. :func:`check_init_from` checks the export
against the config before data is opened or anything is compiled: it must exist, its encoder and
BatchNorm settings must be the config's, and heads that are loaded must have the config's shapes.

``init_from`` may instead name a timm Vision Transformer checkpoint, a ``*.safetensors`` file
with timm's ``VisionTransformer`` keys (ours, ``byol_flax.export --format=torch`` of a ViT, or
a stock one such as the Hugging Face hub's ``model.safetensors``; ``head.*`` is ignored): the
config's encoder must be a ViT whose every tensor has the file's key and shape
(:mod:`byol_flax.export.timm_vit`). The file is read with ``safetensors.numpy`` (no pickle).
When it carries our metadata, its heads and pooling must be the config's and every tensor's
checksum is verified; a stock file records no heads, so the config's are assumed.

Only a new run is initialised: a resumed run's checkpoint holds the weights, so
:mod:`byol_flax.train` does not apply ``init_from`` then (and a resume may change the key).
"""

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from safetensors import safe_open

from byol_flax.checkpointing import flatten_dotted, layout_differences, stored_layout
from byol_flax.config import ConfigError
from byol_flax.export import timm_vit
from byol_flax.export.torch_format import FORMAT_VERSION, METADATA_KEY
from byol_flax.models.byol import build_encoder_from_config, build_online_network
from byol_flax.models.vit import VisionTransformer, sincos_position_embedding
from byol_flax.runtime import console
from byol_flax.storage import files, json_files, schemas
from byol_flax.train_state import TrainState
from byol_flax.weights.encoder import (
    CHECKSUMS_KEY,
    ENCODER_CONFIG_NAME,
    HEADS_DIR,
    WEIGHTS_DIR,
    SourceError,
    absolute_path,
    fingerprint,
    read_export_config,
    read_verified_arrays,
    set_arrays,
)

# What the export's encoder must share with config.model (dotted within it): the architecture,
# and the BatchNorm settings its running statistics were estimated with.
ARCHITECTURE_KEYS = ("encoder.name", "encoder.width_multiplier", "encoder.stem",
                     "batchnorm.decay", "batchnorm.eps")
LOADABLE_HEADS = ("projector", "predictor")  # the online classifier always starts fresh
TIMM_SUFFIX = ".safetensors"  # init_from naming such a file: a timm ViT checkpoint
IGNORED_TIMM_PREFIX = "head."  # a timm classifier: BYOL's heads are not timm's
READABLE_DTYPES = ("F16", "F32", "F64")  # what NumPy reads (bfloat16 needs torch)
SINCOS_ATOL = 1e-3  # the sin-cos embedding as a float16 file holds it


class InitFromError(ConfigError):
    """``config.model.init_from`` names no export this config can start from."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A checked export to start from."""

    path: epath.Path
    meta: dict[str, Any]  # its encoder_config.json
    kept: tuple[str, ...]  # the loadable heads the export holds
    heads: tuple[str, ...]  # those to load (kept, and model.init_from_heads)
    # "export": an export directory; "timm": a timm ViT .safetensors file, whose meta holds
    # "origin" and the checksums of our metadata (None for a stock file).
    layout: Literal["export", "timm"] = "export"


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def _stored(path: epath.Path, key: str) -> dict[str, Any]:
    try:
        return stored_layout(path)
    except Exception as error:
        raise InitFromError(f"{key}: {path} cannot be read: {_one_line(error)}") from error


def _shapes_head(key: str, head: str) -> bool:
    """Whether the config.model key (dotted within it) shapes ``head``: its own section, and the
    projection size, which is the predictor's input and output size too."""
    return key.startswith(f"{head}.") or key == "projector.output_size"


def check_init_from(config: ml_collections.ConfigDict) -> InitSource:
    """The export (or timm ViT ``.safetensors`` file) ``config.model.init_from`` names, checked
    against ``config.model`` without loading the weights (a timm file's position embedding
    alone is read, against a fixed sin-cos one); raises :class:`InitFromError` in one line naming
    the key and what differs."""
    model = config.model
    key = f"config.model.init_from={model.init_from!r}"
    path = absolute_path(model.init_from)
    where = "" if str(path) == model.init_from else f" ({path})"
    if path.name.endswith(TIMM_SUFFIX) and not path.is_dir():
        if not path.is_file():
            raise InitFromError(f"{key}: no such file{where}")
        return _check_timm_file(model, path, key)
    if not path.is_dir():
        raise InitFromError(f"{key}: no such directory{where}; init_from names an export "
                            f"directory or a timm ViT checkpoint (*{TIMM_SUFFIX})")
    try:
        meta = read_export_config(path)
    except (SourceError, ValueError) as error:
        raise InitFromError(f"{key}: {error}") from error
    ours = flatten_dotted(json.loads(model.to_json()))
    theirs = flatten_dotted(meta["model"])
    differing = [f"model.{k}: export {theirs.get(k)!r}, config {ours.get(k)!r}"
                 for k in ARCHITECTURE_KEYS if theirs.get(k) != ours.get(k)]
    if differing:
        raise InitFromError(
            f"{key}: the export's encoder differs from this config's: {'; '.join(differing)}. "
            f"Set these keys to the export's values (its {ENCODER_CONFIG_NAME}) or start from "
            "another export")
    # The shapes this config builds (nothing allocated), against those the export stored.
    abstract = nnx.eval_shape(lambda: build_online_network(model, rngs=nnx.Rngs(0)))
    problems = layout_differences(_stored(path / WEIGHTS_DIR, key),
                                  nnx.to_pure_dict(nnx.state(abstract.encoder)))
    if problems:
        raise InitFromError(f"{key}: the export's encoder arrays do not fit model.encoder: "
                            f"{'; '.join(problems[:3])}")
    kept = tuple(name for name in LOADABLE_HEADS if name in (meta.get("heads") or {}))
    heads = kept if model.init_from_heads else ()
    stored = _stored(path / HEADS_DIR, key) if heads else {}
    mismatched = []
    for name in heads:
        problems = layout_differences(stored.get(name, {}),
                                      nnx.to_pure_dict(nnx.state(getattr(abstract, name))))
        if problems:  # named by the config keys that differ, else by the arrays
            keys = [f"model.{k}: export {theirs.get(k)!r}, config {ours.get(k)!r}"
                    for k in sorted(ours.keys() | theirs.keys())
                    if _shapes_head(k, name) and ours.get(k) != theirs.get(k)]
            mismatched.append(f"{name} ({'; '.join(keys or problems[:3])})")
    if mismatched:
        raise InitFromError(
            f"{key}: the export's heads have other shapes than config.model builds: "
            f"{', '.join(mismatched)}; set model.init_from_heads=False to start the projector "
            "and predictor from random init")
    return InitSource(path, meta, kept, heads)


def _shape_difference(name: str, stored: tuple[int, ...] | None,
                      expected: tuple[int, ...] | None) -> str:
    if stored is None:
        return f"tensor {name} is missing from the file, the config's encoder needs {expected}"
    if expected is None:
        return f"tensor {name} is {stored} in the file, the config's encoder has no such tensor"
    return f"tensor {name} is {stored} in the file, the config's encoder needs {expected}"


def _check_timm_metadata(text: str, encoder: VisionTransformer, where: str) -> dict[str, Any]:
    """Our metadata in a timm file (``byol_flax.export --format=torch``): a ViT export whose
    heads and pooling are the config's; returns it (its checksums are verified on load)."""
    try:
        meta = json_files.loads(text, name=f"{where}: metadata {METADATA_KEY!r}",
                                spec=schemas.SAFETENSORS_METADATA)
    except files.StorageError as error:
        raise InitFromError(str(error)) from None
    if not isinstance(meta, dict) or meta.get("layout") != timm_vit.LAYOUT \
            or meta.get("format_version") != FORMAT_VERSION:
        raise InitFromError(f"{where}: metadata {METADATA_KEY!r} is not that of a format "
                            f"{FORMAT_VERSION} ViT export (layout {timm_vit.LAYOUT!r})")
    arch = meta.get("architecture") if isinstance(meta.get("architecture"), dict) else {}
    ours = timm_vit.timm_architecture(encoder)
    differing = [f"{name} ({config_key}): file {arch.get(name)!r}, config {ours[name]!r}"
                 for name, config_key in (("num_heads", "model.encoder.num_heads"),
                                          ("global_pool", "model.encoder.pooling"))
                 if arch.get(name) != ours[name]]
    if differing:
        raise InitFromError(f"{where}: the file's ViT differs from this config's: "
                            f"{'; '.join(differing)}")
    if not isinstance(meta.get(CHECKSUMS_KEY), dict):
        raise InitFromError(f"{where}: metadata {METADATA_KEY!r} holds no per-tensor checksums")
    return meta


def _check_timm_file(model: ml_collections.ConfigDict, path: epath.Path, key: str
                     ) -> InitSource:
    """A timm ViT ``.safetensors`` file checked against ``model.encoder`` from its header (and
    its position embedding against a fixed sin-cos one): every key and shape as
    :func:`byol_flax.export.timm_vit.timm_arrays` would write them for the config's encoder."""
    encoder = nnx.eval_shape(lambda: build_encoder_from_config(model, rngs=nnx.Rngs(0)))
    if not isinstance(encoder, VisionTransformer):
        raise InitFromError(f"{key}: a {TIMM_SUFFIX} file is a timm Vision Transformer "
                            f"checkpoint, and model.encoder.name={model.encoder.name!r} is not a "
                            "ViT; a ResNet starts from an export directory")
    try:
        files.check_regular(path, what=f"{key} file")
    except files.StorageError as error:
        raise InitFromError(str(error)) from None
    try:
        with safe_open(os.fspath(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()
                      if not name.startswith(IGNORED_TIMM_PREFIX)}
            dtypes = {name: handle.get_slice(name).get_dtype() for name in stored}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise InitFromError(f"{key}: {path} is not a readable safetensors file: "
                            f"{_one_line(error)}") from None
    meta = (_check_timm_metadata(metadata[METADATA_KEY], encoder, key)
            if METADATA_KEY in metadata else None)
    expected = timm_vit.timm_shapes(encoder)
    differing = [name for name in sorted(expected.keys() | stored.keys())
                 if expected.get(name) != stored.get(name)]
    if differing:
        first = differing[0]
        more = f" ({len(differing) - 1} more tensors differ)" if len(differing) > 1 else ""
        raise InitFromError(
            f"{key}: the file's tensors do not fit model.encoder ({model.encoder.name}: "
            f"{encoder.depth} blocks, {encoder.patch_size}-px patches, {encoder.image_size}-px "
            f"images, width {encoder.num_features}, {encoder.pooling} pooling): "
            f"{_shape_difference(first, stored.get(first), expected.get(first))}{more}")
    unreadable = [name for name in sorted(dtypes) if dtypes[name] not in READABLE_DTYPES]
    if unreadable:
        raise InitFromError(f"{key}: tensor {unreadable[0]} is {dtypes[unreadable[0]]}: only "
                            f"{', '.join(READABLE_DTYPES)} are read (convert the file to float32)")
    if encoder.position_embedding_kind == "sincos":
        with safe_open(os.fspath(path), framework="np") as handle:
            stored_embedding = handle.get_tensor("pos_embed")[0].astype(np.float32)
        fixed = np.asarray(sincos_position_embedding(encoder.grid, encoder.num_features))
        if not np.allclose(stored_embedding, fixed, atol=SINCOS_ATOL, rtol=0):
            raise InitFromError(
                f"{key}: tensor pos_embed is not the fixed sin-cos embedding that "
                "model.encoder.position_embedding='sincos' keeps frozen; set it to 'learned' to "
                "load (and train) the file's")
    origin = {"kind": "timm_file", "path": str(path), "byol_flax_metadata": meta is not None,
              "num_heads": encoder.num_heads}
    if meta is not None:
        origin.update(timm_model=meta.get("timm_model"), encoder=meta.get("encoder"))
    return InitSource(path, {"origin": origin,
                             CHECKSUMS_KEY: meta[CHECKSUMS_KEY] if meta else None},
                      (), (), layout="timm")


def _read_timm_arrays(source: InitSource, encoder: VisionTransformer, key: str
                      ) -> dict[str, Any]:
    """The file's tensors as ``encoder``'s pure dict, checksums verified when recorded."""
    names = timm_vit.timm_shapes(encoder)
    try:
        with safe_open(os.fspath(source.path), framework="np") as handle:
            tensors = {name: handle.get_tensor(name) for name in names}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise InitFromError(f"{key}: {source.path} cannot be read: {_one_line(error)}") from None
    for name in sorted(tensors):
        if not np.all(np.isfinite(tensors[name])):
            raise InitFromError(f"{key}: tensor {name} of {source.path} holds NaN or infinite "
                                "values: not a trained encoder to start from")
    checksums = source.meta[CHECKSUMS_KEY]
    for name in sorted(tensors) if checksums is not None else ():
        digest = hashlib.sha256(np.ascontiguousarray(tensors[name]).tobytes()).hexdigest()
        if checksums.get(name) != digest:
            raise InitFromError(f"{key}: {source.path} is damaged: tensor {name} differs from "
                                "the checksum recorded at export time")
    return jax.tree.map(jnp.asarray, timm_vit.arrays_from_timm(encoder, tensors))


def _apply_timm_file(state: TrainState, source: InitSource) -> dict[str, Any]:
    """:func:`apply_init_from` for a timm ViT file: the encoder only (no heads in it)."""
    encoder = state.online.encoder
    key = f"config.model.init_from={os.fspath(source.path)!r}"
    set_arrays(encoder, _read_timm_arrays(source, encoder, key))
    if state.target is not None:
        nnx.update(state.target, jax.tree.map(jnp.copy,
                                              nnx.state(state.online_without_predictor())))
    origin = source.meta["origin"]
    provenance = {"path": str(source.path), "fingerprint": fingerprint(encoder), "heads": [],
                  "origin": origin}
    if not origin["byol_flax_metadata"]:
        logging.warning("%s records no attention heads (not written by byol_flax.export): "
                        "assuming model.encoder's %d", source.path, encoder.num_heads)
    console.stage("starting from the timm ViT checkpoint %s (encoder fingerprint %s, %s): "
                  "encoder loaded; projector and predictor from random init (not in the "
                  "file); target copied from it, optimizer state fresh, step 0", source.path,
                  provenance["fingerprint"], "checksums verified" if source.meta[CHECKSUMS_KEY]
                  else "no checksums recorded")
    return provenance


def apply_init_from(state: TrainState, source: InitSource) -> dict[str, Any]:
    """Puts the export's arrays into a new run's ``state`` (of
    :func:`byol_flax.train_state.create_train_state`) and makes the target their copy; the
    optimizer state, classifier and step stay as built. Returns the provenance the run records
    (export path, encoder fingerprint, heads loaded, the export's origin)."""
    if source.layout == "timm":
        return _apply_timm_file(state, source)
    encoder = state.online.encoder
    checksums = source.meta[CHECKSUMS_KEY]
    key = f"config.model.init_from={os.fspath(source.path)!r}"
    try:
        set_arrays(encoder, read_verified_arrays(source.path / WEIGHTS_DIR,
                                                 nnx.to_pure_dict(nnx.state(encoder)),
                                                 checksums.get(WEIGHTS_DIR)))
        for name in source.heads:
            module = getattr(state.online, name)
            arrays = nnx.to_pure_dict(nnx.state(module))
            if arrays:  # parameter-free predictors (identity, closed form) have nothing to load
                set_arrays(module, read_verified_arrays(source.path / HEADS_DIR, arrays,
                                                        checksums.get(HEADS_DIR), (name,))[name])
    except SourceError as error:
        raise InitFromError(f"{key}: {error}") from error
    if state.target is not None:
        nnx.update(state.target, jax.tree.map(jnp.copy,
                                              nnx.state(state.online_without_predictor())))
    provenance = {"path": str(source.path), "fingerprint": fingerprint(encoder),
                  "heads": list(source.heads), "origin": source.meta["origin"]}
    fresh = [name for name in LOADABLE_HEADS if name not in source.heads]
    why = ("model.init_from_heads=False" if source.kept and not source.heads
           else "not kept by the export")
    console.stage("starting from the export %s (encoder fingerprint %s, origin %s): encoder%s "
                  "loaded%s; target copied from it, optimizer state fresh, step 0",
                  source.path, provenance["fingerprint"], json.dumps(source.meta["origin"]),
                  "".join(f", {name}" for name in source.heads),
                  f"; {' and '.join(fresh)} from random init ({why})" if fresh else "")
    return provenance
