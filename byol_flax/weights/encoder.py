"""Encoders coming in: an export, a pre-training checkpoint's encoder, a random-init or raw-pixel
baseline, each read, verified and built into an ``nnx.Module`` (:func:`load_source`).

An export directory (written by :mod:`byol_flax.export.encoder`) holds
  * ``encoder/``: an Orbax checkpoint of the online encoder's arrays (``nnx.Param`` weights and
    ``nnx.BatchStat`` running statistics) as a plain nested dict: no optimizer, no target, no
    projector or predictor;
  * ``encoder_config.json``: what :func:`load_encoder` needs to rebuild the module (the
    pre-training run's ``config.model`` plus a format version);
  * ``heads/`` (optional, listed under ``"heads"`` in ``encoder_config.json``): the projector,
    predictor and online classifier, when the source had them (an imported official
    checkpoint): what continuing pre-training from an export, or the online-classifier
    evaluation, needs;
  * ``MODEL_CARD.md`` / ``model_card.json`` (see :mod:`byol_flax.export.model_card`);
  * ``.byol_flax_output.json``: the marker that lets a later export replace this one
    (:mod:`byol_flax.runtime.outputs`).

``encoder_config.json`` records a sha256 per array (``checksums``), verified on every load: a
damaged export is refused naming the array and the file, as a damaged checkpoint is.

Reuse it with two lines and no training code::

    from byol_flax.weights import load_encoder
    encoder = load_encoder("exports/r50")   # nnx.Module: uint8->normalised images -> (B, 2048)
    encoder.eval()                          # BatchNorm uses the stored running statistics
"""

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from byol_flax.checkpointing import DamagedCheckpointError, flatten_dotted, read_pytree
from byol_flax.config import base_config, value_at
from byol_flax.errors import UserError
from byol_flax.models.byol import build_encoder_from_config, build_heads, build_online_classifier
from byol_flax.models.encoders import ENCODERS, WIDTH_MULTIPLIERS
from byol_flax.models.init import init_module
from byol_flax.models.predictors import PREDICTORS
from byol_flax.storage import files, json_files
from byol_flax.weights.checkpoint import read_encoder

# 2: per-array sha256 checksums in encoder_config.json (1 had none; the package was never
# released with it).
EXPORT_FORMAT_VERSION = 2
ENCODER_CONFIG_NAME = "encoder_config.json"
WEIGHTS_DIR = "encoder"
HEADS_DIR = "heads"
CHECKSUMS_KEY = "checksums"  # encoder_config.json: {"encoder": {path: sha256}, "heads": {...}}
CONFIG_MAX_BYTES = 16 << 20  # encoder_config.json holds configs and checksums: a few kB
RANDOM_PREFIX = "random:"
PIXELS_SOURCE = "pixels"
HEAD_NAMES = ("projector", "predictor", "classifier")
# Limits on architectures read from files (exports, the official release), checked from shapes
# before anything is allocated. Appendix D.2, Table 9: the largest encoder, ResNet-152 3x, has
# 522M weights; with the paper's heads at its width (projector 4096/256, predictor 4096, 1000
# classes: ~35M) and BatchNorm statistics it is under 600M numbers.
MAX_PARAMETERS = 600_000_000
MAX_HEAD_WIDTH = 65_536  # hidden and output sizes of the heads, and classifier classes
MAX_HEAD_DEPTH = 16


class SourceError(UserError, ValueError):
    """An evaluation source is neither an export, a pre-training workdir, nor ``random:PATH``."""


@dataclasses.dataclass
class PretrainedEncoder:
    """An encoder and where it came from (recorded in results and model cards)."""

    encoder: nnx.Module  # a ResNet or VisionTransformer (byol_flax.models.encoders)
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
                              abstract: bool = False) -> nnx.Module:
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


def load_encoder(export_dir: epath.PathLike) -> nnx.Module:
    """The documented loader: an exported encoder as an ``nnx.Module`` (call ``.eval()``).

    Input: images normalised as in pre-training (``byol_flax.data.augment.normalize`` of [0, 1]
    RGB); output: the representation y, shape (B, ``encoder.num_features``).
    """
    return load_export(export_dir).encoder


def _regular_file(path: epath.Path, what: str) -> epath.Path:
    """``path`` if it is a regular file of its own (not a link, device or FIFO)."""
    text = os.fspath(path)
    if "://" not in text and os.path.islink(text):
        raise SourceError(f"{path} is a symbolic link (to {os.readlink(text)}): an export's "
                          f"{what} is a file of its own; not following it")
    if not path.exists():
        raise SourceError(f"{path.parent} is not an encoder export: {path.name} missing")
    if "://" not in text and not os.path.isfile(text):
        raise SourceError(f"{path} is not a regular file: not an encoder export's {what}")
    return path


def check_model_config(model: Any, where: str) -> dict[str, Any]:
    """``model`` (a ``config.model`` read from a file) checked against the registry and the
    limits above before any module is built; returns it. Raises :class:`SourceError` naming
    ``where`` and the key."""
    def fail(key: str, problem: str) -> SourceError:
        return SourceError(f"{where}: model.{key} {problem}")

    if not isinstance(model, dict):
        raise SourceError(f"{where}: 'model' is a {type(model).__name__}, not a mapping")
    config = base_config().model
    config.lock()
    try:
        config.update(model)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        reason = str(error).strip("'\"").split(" Other fields present")[0].splitlines()
        raise SourceError(f"{where}: 'model' does not fit this code's config.model: "
                          f"{reason[0] if reason else type(error).__name__}") from None
    encoder, projector, predictor = config.encoder, config.projector, config.predictor
    if encoder.name not in ENCODERS:
        raise fail("encoder.name", f"{encoder.name!r} is not a registered encoder "
                   f"({', '.join(ENCODERS)})")
    checks = [
        (encoder.width_multiplier in WIDTH_MULTIPLIERS, "encoder.width_multiplier",
         f"one of {WIDTH_MULTIPLIERS}"),
        (encoder.stem in ("imagenet", "small"), "encoder.stem", "'imagenet' or 'small'"),
        (predictor.kind in PREDICTORS, "predictor.kind", f"one of {list(PREDICTORS)}"),
        (0 < config.batchnorm.eps < 1, "batchnorm.eps", "in (0, 1)"),
        (0 <= config.batchnorm.decay <= 1, "batchnorm.decay", "in [0, 1]"),
    ]
    for head, name in ((projector, "projector"), (predictor, "predictor")):
        checks.append((1 <= head.depth <= MAX_HEAD_DEPTH, f"{name}.depth",
                       f"between 1 and {MAX_HEAD_DEPTH}"))
        checks += [(1 <= head[key] <= MAX_HEAD_WIDTH, f"{name}.{key}",
                    f"between 1 and {MAX_HEAD_WIDTH}")
                   for key in ("hidden_size", "output_size") if key in head]
    for ok, key, expected in checks:
        if not ok:
            raise fail(key, f"is {value_at(config, key)!r}, must be {expected}")
    checked = config.to_dict()
    parameters = parameter_count(checked)
    if parameters > MAX_PARAMETERS:
        raise SourceError(f"{where}: the model has {parameters:,} parameters, more than the "
                          f"{MAX_PARAMETERS:,} this reader accepts")
    return checked


def parameter_count(model_config: dict[str, Any], *, num_classes: int = 0) -> int:
    """Parameters (and BatchNorm statistics) of the encoder and heads ``model_config`` builds,
    and of the online classifier with ``num_classes``, from shapes alone (nothing allocated):
    what readers of files bound by :data:`MAX_PARAMETERS` before building anything."""
    encoder = encoder_from_model_config(model_config, abstract=True)
    heads = heads_from_model_config(model_config, encoder.num_features, num_classes=num_classes,
                                    abstract=True)
    return sum(int(np.prod(leaf.shape)) for module in (encoder, *heads.values())
               for leaf in jax.tree.leaves(nnx.state(module)))


def read_export_config(export_dir: epath.PathLike) -> dict[str, Any]:
    """The ``encoder_config.json`` of an export (model config, origin, heads kept, checksums),
    checked to be one this code reads and builds within its limits; raises
    :class:`SourceError` naming the file otherwise."""
    export_dir = absolute_path(export_dir)
    config_path = export_dir / ENCODER_CONFIG_NAME
    if not export_dir.is_dir():
        raise SourceError(f"{export_dir} is not an encoder export: not a directory")
    _regular_file(config_path, ENCODER_CONFIG_NAME)
    try:
        meta = json_files.read(config_path, what="export config", max_bytes=CONFIG_MAX_BYTES)
    except files.StorageError as error:
        raise SourceError(str(error)) from None
    except OSError as error:
        raise SourceError(f"{config_path} cannot be read as JSON: {error}") from None
    if not isinstance(meta, dict):
        raise SourceError(f"{config_path} holds a {type(meta).__name__}, not an export's "
                          "JSON object")
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise SourceError(f"{config_path}: format_version {meta.get('format_version')!r}, this "
                          f"code reads {EXPORT_FORMAT_VERSION}")
    if not isinstance(meta.get("origin"), dict) or not isinstance(meta.get(CHECKSUMS_KEY), dict):
        raise SourceError(f"{config_path} lacks 'origin' or '{CHECKSUMS_KEY}': not written by "
                          "this code")
    meta["model"] = check_model_config(meta.get("model"), str(config_path))
    heads = meta.get("heads") or {}
    if not isinstance(heads, dict) or set(heads) - set(HEAD_NAMES):
        raise SourceError(f"{config_path}: 'heads' must map some of {list(HEAD_NAMES)}, got "
                          f"{heads!r:.80}")
    if "classifier" in heads:
        classes = heads["classifier"].get("num_classes") if isinstance(
            heads["classifier"], dict) else None
        if not isinstance(classes, int) or not 1 <= classes <= MAX_HEAD_WIDTH:
            raise SourceError(f"{config_path}: heads.classifier.num_classes is {classes!r:.40}, "
                              f"must be an integer between 1 and {MAX_HEAD_WIDTH:,}")
    meta["heads"] = heads
    return meta


def array_checksums(tree: dict[str, Any]) -> dict[str, str]:
    """{dotted path: sha256 of the array's bytes} of a pure dict of arrays: what an export
    records and its loaders verify."""
    return {key: hashlib.sha256(np.ascontiguousarray(np.asarray(value)).tobytes()).hexdigest()
            for key, value in flatten_dotted(tree).items()}


def verify_arrays(tree: dict[str, Any], expected: dict[str, Any], where: epath.Path) -> None:
    """Raises :class:`SourceError` naming the first array of ``tree`` whose sha256 differs from
    (or is missing in) ``expected``, and the directory it was read from."""
    if not isinstance(expected, dict):
        raise SourceError(f"{where}: no checksums recorded for its arrays")
    for key, digest in array_checksums(tree).items():
        if expected.get(key) != digest:
            problem = "has no recorded checksum" if key not in expected else (
                "differs from the checksum recorded at export time")
            raise SourceError(f"{where} is damaged: array {key} {problem}")


def read_verified_arrays(directory: epath.Path, target: dict[str, Any], expected: Any,
                         prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """The arrays of an export's Orbax tree ``directory`` shaped like ``target`` (under
    ``prefix``, see :func:`byol_flax.checkpointing.read_pytree`), each checked against the sha256
    recorded at export time (``expected``); :class:`SourceError` naming the array otherwise."""
    try:
        arrays = read_pytree(directory, target, prefix)
    except Exception as error:
        # TensorStore appends its whole spec after "See full TensorStore details": not for people.
        reason = str(error).split("See full TensorStore details")[0].strip().rstrip(".;:,")
        first = (reason.splitlines() or [type(error).__name__])[0]
        raise SourceError(f"{directory} cannot be read (damaged or incomplete export): "
                          f"{first[:300]}") from error
    verify_arrays(arrays, expected, directory)
    return arrays


def load_export(export_dir: epath.PathLike, *, with_heads: bool = False) -> PretrainedEncoder:
    """An export directory -> :class:`PretrainedEncoder` (encoder, model config, provenance);
    ``with_heads``: also the projector, predictor and classifier the export kept (if any).
    Every array is checked against the sha256 recorded at export time."""
    export_dir = absolute_path(export_dir)
    meta = read_export_config(export_dir)
    checksums = meta[CHECKSUMS_KEY]
    encoder = encoder_from_model_config(meta["model"])
    set_arrays(encoder, read_verified_arrays(export_dir / WEIGHTS_DIR,
                                     nnx.to_pure_dict(nnx.state(encoder)),
                                     checksums.get(WEIGHTS_DIR)))
    heads: dict[str, nnx.Module] = {}
    kept = meta["heads"]
    if with_heads and kept:
        built = heads_from_model_config(
            meta["model"], encoder.num_features,
            num_classes=kept.get("classifier", {}).get("num_classes", 0))
        heads = {name: built[name] for name in kept}
        arrays = read_verified_arrays(export_dir / HEADS_DIR,
                              {name: nnx.to_pure_dict(nnx.state(module))
                               for name, module in heads.items()}, checksums.get(HEADS_DIR))
        for name, module in heads.items():
            set_arrays(module, arrays[name])
    return PretrainedEncoder(encoder, meta["model"],
                             {"kind": "export", "path": str(export_dir), **meta["origin"],
                              "fingerprint": fingerprint(encoder)},
                             meta.get("pretrain_config"), **heads)


def load_pretraining_encoder(workdir: epath.PathLike, step: int | None = None
                             ) -> PretrainedEncoder:
    """The online encoder of a pre-training workdir's checkpoint (the newest valid one by
    default), read and verified by :func:`byol_flax.weights.checkpoint.read_encoder`, with the
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
