"""The pre-trained encoder on its own: export, reload, and the sources evaluation accepts.

An export directory holds
  * ``encoder/``: an Orbax checkpoint of the online encoder's arrays (``nnx.Param`` weights and
    ``nnx.BatchStat`` running statistics) as a plain nested dict: no optimizer, no target, no
    projector or predictor;
  * ``encoder_config.json``: what :func:`load_encoder` needs to rebuild the module (the
    pre-training run's ``config.model`` plus a format version);
  * ``heads/`` (optional, listed under ``"heads"`` in ``encoder_config.json``): the projector,
    predictor and online classifier, when the source had them (an imported official
    checkpoint): what continuing pre-training from an export, or the online-classifier
    evaluation, needs;
  * ``MODEL_CARD.md`` / ``model_card.json`` (see :mod:`byol_flax.export.model_card`).

Reuse it with two lines and no training code::

    from byol_flax.export.encoder import load_encoder
    encoder = load_encoder("exports/r50")   # nnx.Module: uint8->normalised images -> (B, 2048)
    encoder.eval()                          # BatchNorm uses the stored running statistics
"""

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from byol_flax.errors import UserError
from byol_flax.checkpointing import DamagedCheckpointError, read_pytree
from byol_flax.checkpointing.encoder import read_encoder
from byol_flax.models.byol import (build_encoder_from_config, build_heads,
                                   build_online_classifier)
from byol_flax.models.init import init_module
from byol_flax.models.resnet import ResNet

EXPORT_FORMAT_VERSION = 1
ENCODER_CONFIG_NAME = "encoder_config.json"
WEIGHTS_DIR = "encoder"
HEADS_DIR = "heads"
RANDOM_PREFIX = "random:"
PIXELS_SOURCE = "pixels"


class SourceError(UserError, ValueError):
    """An evaluation source is neither an export, a pre-training workdir, nor ``random:PATH``."""


@dataclasses.dataclass
class PretrainedEncoder:
    """An encoder and where it came from (recorded in results and model cards)."""

    encoder: ResNet
    model_config: dict[str, Any]  # config.model of the pre-training run (JSON form)
    origin: dict[str, Any]  # {"kind": "export" | "pretraining" | "random", "path", "step", ...}
    pretrain_config: dict[str, Any] | None = None  # the whole pre-training config, if known
    # The online classifier (a linear layer on the representation): of the live state of a run
    # (training monitors), or of an export that kept its heads.
    classifier: nnx.Module | None = None
    projector: nnx.Module | None = None  # g, when the export kept its heads
    predictor: nnx.Module | None = None  # q, likewise

    def heads(self) -> dict[str, nnx.Module]:
        """The heads present, by name (``projector``, ``predictor``, ``classifier``)."""
        return {name: module for name, module in (("projector", self.projector),
                                                  ("predictor", self.predictor),
                                                  ("classifier", self.classifier))
                if module is not None}


def absolute_path(path: epath.PathLike) -> epath.Path:
    """Orbax wants absolute local paths; gs:// paths pass through."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _build(build: Callable[[], Any], abstract: bool) -> Any:
    """``build()`` initialised in one compiled program, or only its shapes (``abstract``: the
    structure with ``jax.ShapeDtypeStruct`` leaves, nothing allocated)."""
    return nnx.eval_shape(build) if abstract else init_module(build)


def encoder_from_model_config(model_config: dict[str, Any], *, seed: int = 0,
                              abstract: bool = False) -> ResNet:
    """Builds (randomly initialised, or shape-only with ``abstract``) the encoder a
    pre-training ``config.model`` describes."""
    config = ml_collections.ConfigDict(model_config)
    return _build(lambda: build_encoder_from_config(config, rngs=nnx.Rngs(seed)), abstract)


def heads_from_model_config(model_config: dict[str, Any], num_features: int, *,
                            num_classes: int = 0, seed: int = 0, abstract: bool = False
                            ) -> dict[str, nnx.Module]:
    """Builds (randomly initialised, or shape-only with ``abstract``) the projector and
    predictor a ``config.model`` describes, and, with ``num_classes``, the online classifier:
    the modules of :func:`build_online_network` and
    :func:`byol_flax.train_state.create_train_state`."""
    config = ml_collections.ConfigDict(model_config)

    def build() -> dict[str, nnx.Module]:
        rngs = nnx.Rngs(seed)
        heads = dict(zip(("projector", "predictor"),
                         build_heads(config, num_features, rngs=rngs)))
        if num_classes:
            heads["classifier"] = build_online_classifier(num_features, num_classes, rngs=rngs)
        return heads

    return _build(build, abstract)


def set_arrays(module: nnx.Module, arrays: dict[str, Any]) -> None:
    """Puts ``arrays`` (a pure dict shaped like the module's state) into ``module``."""
    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, arrays)
    nnx.update(module, state)


def fingerprint(module: nnx.Module) -> str:
    """A digest of every array of ``module``: results and caches key on the weights, not only
    on the path and step they were read from."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(nnx.state(module)):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def load_encoder(export_dir: epath.PathLike) -> ResNet:
    """The documented loader: an exported encoder as an ``nnx.Module`` (call ``.eval()``).

    Input: images normalised as in pre-training (``byol_flax.data.augment.normalize`` of [0, 1]
    RGB); output: the representation y, shape (B, ``encoder.num_features``).
    """
    return load_export(export_dir).encoder


def read_export_config(export_dir: epath.PathLike) -> dict[str, Any]:
    """The ``encoder_config.json`` of an export (model config, origin, heads kept), checked to
    be one this code reads; raises :class:`SourceError` naming the file otherwise."""
    export_dir = absolute_path(export_dir)
    config_path = export_dir / ENCODER_CONFIG_NAME
    if not config_path.exists():
        raise SourceError(f"{export_dir} is not an encoder export: {ENCODER_CONFIG_NAME} missing")
    meta = json.loads(config_path.read_text())
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise SourceError(f"{config_path}: format_version {meta.get('format_version')!r}, this "
                          f"code reads {EXPORT_FORMAT_VERSION}")
    if "model" not in meta or "origin" not in meta:
        raise SourceError(f"{config_path} lacks 'model' or 'origin': not written by this code")
    return meta


def load_export(export_dir: epath.PathLike, *, with_heads: bool = False) -> PretrainedEncoder:
    """An export directory -> :class:`PretrainedEncoder` (encoder, model config, provenance);
    ``with_heads``: also the projector, predictor and classifier the export kept (if any)."""
    export_dir = absolute_path(export_dir)
    meta = read_export_config(export_dir)
    encoder = encoder_from_model_config(meta["model"])
    set_arrays(encoder, read_pytree(export_dir / WEIGHTS_DIR,
                                     nnx.to_pure_dict(nnx.state(encoder))))
    heads: dict[str, nnx.Module] = {}
    kept = meta.get("heads", {})
    if with_heads and kept:
        built = heads_from_model_config(meta["model"], encoder.num_features,
                                        num_classes=kept.get("classifier", {}).get("num_classes", 0))
        heads = {name: built[name] for name in kept}
        arrays = read_pytree(export_dir / HEADS_DIR, {name: nnx.to_pure_dict(nnx.state(module))
                                                      for name, module in heads.items()})
        for name, module in heads.items():
            set_arrays(module, arrays[name])
    return PretrainedEncoder(encoder, meta["model"],
                             {"kind": "export", "path": str(export_dir), **meta["origin"],
                              "fingerprint": fingerprint(encoder)},
                             meta.get("pretrain_config"), **heads)


def load_pretraining_encoder(workdir: epath.PathLike, step: int | None = None
                             ) -> PretrainedEncoder:
    """The online encoder of a pre-training workdir's checkpoint (the newest valid one by
    default), read and verified by :func:`byol_flax.checkpointing.encoder.read_encoder`, with the
    config that step was trained with."""
    workdir = absolute_path(workdir)
    try:
        saved = read_encoder(workdir, step)
    except DamagedCheckpointError as error:
        raise SourceError(str(error)) from error
    encoder = encoder_from_model_config(saved.model_config)
    set_arrays(encoder, saved.arrays)
    return PretrainedEncoder(encoder, saved.model_config,
                             {"kind": "pretraining", "path": str(workdir), "step": saved.step,
                              "fingerprint": fingerprint(encoder)}, saved.pretrain_config)


class PixelEncoder(nnx.Module):
    """The raw-pixel baseline as an "encoder": the normalised image, flattened."""

    def __init__(self, image_size: int):
        self.num_features = image_size * image_size * 3

    def __call__(self, images: jax.Array) -> jax.Array:
        return images.reshape(images.shape[0], -1)


def load_source(source: str, *, seed: int = 0, image_size: int = 0) -> PretrainedEncoder:
    """What the evaluation CLI's ``--source`` names.

    * an export directory (holds ``encoder_config.json``);
    * a pre-training workdir (holds ``checkpoints/``): its latest checkpoint;
    * ``random:PATH``: the architecture of the export or workdir at PATH, randomly initialised
      with ``seed`` (the random-init baseline, with exactly the same code path);
    * ``pixels``: raw pixels of the ``image_size`` evaluation view (the linear-on-pixels
      baseline).
    """
    if source == PIXELS_SOURCE:
        return PretrainedEncoder(PixelEncoder(image_size), {}, {"kind": "pixels"})
    if source.startswith(RANDOM_PREFIX):
        reference = load_source(source[len(RANDOM_PREFIX):], seed=seed)
        encoder = encoder_from_model_config(reference.model_config, seed=seed)
        return PretrainedEncoder(encoder, reference.model_config,
                                 {"kind": "random", "path": reference.origin["path"],
                                  "seed": seed}, reference.pretrain_config)
    path = absolute_path(source)
    if (path / ENCODER_CONFIG_NAME).exists():
        return load_export(path)
    if (path / "checkpoints").exists():
        return load_pretraining_encoder(path)
    raise SourceError(f"--source={source!r}: {path} holds neither {ENCODER_CONFIG_NAME} (an "
                      "export) nor checkpoints/ (a pre-training workdir); random:PATH gives the "
                      "random-init baseline of PATH's architecture")


def export_encoder(pretrained: PretrainedEncoder, out_dir: epath.PathLike,
                   write_extra: Callable[[epath.Path], None] | None = None) -> epath.Path:
    """Writes ``encoder/`` and ``encoder_config.json`` (and whatever ``write_extra(directory)``
    adds, e.g. the model card: :func:`byol_flax.export.model_card.write_model_card`) to
    ``out_dir``, atomically: everything is written to a temporary directory beside it that then
    replaces ``out_dir``, so a failed export leaves the previous one intact."""
    def write(staging: epath.Path) -> None:
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        checkpointer.save(staging / WEIGHTS_DIR, args=ocp.args.PyTreeSave(
            nnx.to_pure_dict(nnx.state(pretrained.encoder))))
        heads = pretrained.heads()
        if heads:
            checkpointer.save(staging / HEADS_DIR, args=ocp.args.PyTreeSave(
                {name: nnx.to_pure_dict(nnx.state(module)) for name, module in heads.items()}))
        checkpointer.close()
        origin = {("source_" + k if k in ("kind", "path") else k): v
                  for k, v in pretrained.origin.items() if k != "fingerprint"}
        (staging / ENCODER_CONFIG_NAME).write_text(json.dumps({
            "format_version": EXPORT_FORMAT_VERSION,
            "model": pretrained.model_config,
            "origin": origin,
            "pretrain_config": pretrained.pretrain_config,
            "heads": {name: ({"num_classes": module.out_features} if name == "classifier" else {})
                      for name, module in heads.items()},
        }, indent=2, sort_keys=True))
        if write_extra is not None:
            write_extra(staging)

    out_dir = write_atomically(out_dir, write)
    logging.info("exported the encoder of %s to %s", pretrained.origin, out_dir)
    return out_dir


def write_atomically(out_dir: epath.PathLike, write: Callable[[epath.Path], None]
                     ) -> epath.Path:
    """Runs ``write(staging)`` on a temporary directory beside ``out_dir`` that then replaces
    ``out_dir``: a failed export leaves the previous one intact (every export format)."""
    out_dir = absolute_path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    if staging.exists():
        staging.rmtree()
    staging.mkdir()
    try:
        write(staging)
        _swap_in(staging, out_dir)
    except BaseException:
        if staging.exists():
            staging.rmtree()
        raise
    return out_dir


def _swap_in(staging: epath.Path, out_dir: epath.Path) -> None:
    """Replaces ``out_dir`` by the complete ``staging`` directory; the old one is removed only
    once the new one is in place."""
    previous = out_dir.parent / f".{out_dir.name}.export-old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(previous)
    try:
        staging.rename(out_dir)
    except BaseException:
        if previous.exists() and not out_dir.exists():
            previous.rename(out_dir)
        raise
    if previous.exists():
        previous.rmtree()
