"""Import the checkpoints of the official BYOL release into this project's export format.

DeepMind released ``pretrain_res50x1.pkl`` and ``pretrain_res200x2.pkl`` with the paper
(google-deepmind/deepmind-research, ``byol/``). Its ``utils/checkpointing.py`` writes them with
``dill.dump(..., protocol=2)`` as ``dict(experiment_state=..., step=..., rng=...)``: the
experiment state is a NamedTuple (``byol.byol_experiment._ByolExperimentState``) of online and
target parameters, BatchNorm states and the optimizer state, each a Haiku mapping
``{"module/~/path": {"w" | "b" | "scale" | "offset" | ...: array}}`` of NumPy arrays taken from
device 0.

Nothing in the file is executed: :mod:`byol_flax.weights.safe_pickle` reads it as data, with the
globals of :data:`ALLOWED_GLOBALS` only (NumPy's array pickling, read by the reader itself; the
release's NamedTuples and Haiku mappings, built as plain containers; the helpers dill writes).
Before any module is built, the architecture the parameter names and shapes describe is checked
against the encoder registry (width 1-4, heads of bounded size) and its parameter count bounded
(:data:`MAX_PARAMETERS`); weights must be real and finite.

The online encoder, projector and predictor (and the online classifier) are mapped onto this
project's modules name by name; every array must be consumed and every parameter of our modules
filled, with equal shapes, or the import fails listing what is missing, extra or misshapen.
``tests/test_official_weights.py`` checks the mapped network against a Haiku build of the
official one (a dill 0.3.2 file of a tiny network, ResNet-18 and ResNet-50 outputs equal,
ResNet-200 2x names and shapes); ``tests/test_safe_pickle.py`` the reader's refusals.

Usage::

    byol-import-official --checkpoint=pretrain_res50x1.pkl --out=exports/byol_r50x1_official
    byol-evaluate --config=eval_imagenet:linear --source=exports/byol_r50x1_official ...
"""

import collections
import functools
import inspect
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from byol_flax.config import base_config
from byol_flax.errors import UserError
from byol_flax.models.encoders import ENCODERS, WIDTH_MULTIPLIERS
from byol_flax.weights import safe_pickle
from byol_flax.weights.encoder import (
    MAX_HEAD_WIDTH,
    MAX_PARAMETERS,
    PretrainedEncoder,
    encoder_from_model_config,
    fingerprint,
    heads_from_model_config,
    parameter_count,
)
from byol_flax.weights.safe_pickle import UnsafePickleError, shown

__all__ = ["ALLOWED_GLOBALS", "MAX_PARAMETERS", "OfficialCheckpointError", "UnsafePickleError",
           "describe_architecture", "import_official", "map_official",
           "read_official_checkpoint"]

SOURCE = ("BYOL official release: google-deepmind/deepmind-research byol/ (Grill et al., "
          "NeurIPS 2020), pre-trained on ImageNet ILSVRC-2012 train")
TORSO_SEPARATOR = "/~/"
_HAIKU_BN = {"scale": "scale", "offset": "bias"}  # hk.BatchNorm parameter -> nnx.BatchNorm
_HAIKU_EMA = {"mean_ema": "mean", "var_ema": "var"}  # hk.BatchNorm state -> nnx.BatchNorm


class OfficialCheckpointError(UserError, ValueError):
    """The file is not an official BYOL checkpoint this importer can map (the message says
    exactly what does not match)."""


# -- Plain stand-ins for the classes the official pickle names -------------------------------

class ExperimentState(NamedTuple):
    """The fields of ``byol.byol_experiment._ByolExperimentState``, in its order."""

    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    opt_state: Any


class OptimizerState(tuple):
    """Any optimizer-state NamedTuple of the release (LARS momentum, optax's empty states): kept
    as a plain tuple of its fields, never used."""

    def __new__(cls, *fields: Any) -> "OptimizerState":
        return super().__new__(cls, fields)


def _experiment_state(reader: safe_pickle.SafeUnpickler, *fields: Any) -> ExperimentState:
    return ExperimentState(*fields)


def _optimizer_state(reader: safe_pickle.SafeUnpickler, *fields: Any) -> OptimizerState:
    return OptimizerState(*fields)


def _plain_mapping(reader: safe_pickle.SafeUnpickler, data: Any = None) -> dict:
    """Haiku's ``frozendict`` / ``FlatMapping`` pickle as ``(cls, (dict,))``: a fresh dict."""
    if data is not None and type(data) is not dict:
        raise reader.refused(f"a Haiku mapping given {safe_pickle.describe(data)}, not a dict")
    return dict(data or {})


def _ordered_dict(reader: safe_pickle.SafeUnpickler) -> dict:
    """``collections.OrderedDict()``; its items follow as ``SETITEMS`` on this fresh dict."""
    return {}


_OPTIMIZER_STATES = (
    ("byol.utils.optimizers", "ScaleByLarsState"),
    ("byol.utils.optimizers", "AddWeightDecayState"),
    ("optax._src.transform", "ScaleState"),
    ("optax._src.base", "EmptyState"),
)
_HAIKU_MAPPINGS = (("haiku._src.data_structures", "frozendict"),
                   ("haiku._src.data_structures", "FlatMapping"))

ALLOWED_GLOBALS: dict[tuple[str, str], safe_pickle.Builder | safe_pickle.Token] = {
    **safe_pickle.NUMERIC_GLOBALS,
    ("collections", "OrderedDict"): safe_pickle.Builder("collections.OrderedDict",
                                                        _ordered_dict, "class"),
    ("byol.byol_experiment", "_ByolExperimentState"): safe_pickle.Builder(
        "byol.byol_experiment._ByolExperimentState", _experiment_state, "class",
        ExperimentState._fields),
    **{key: safe_pickle.Builder(".".join(key), _optimizer_state, "class")
       for key in _OPTIMIZER_STATES},
    **{key: safe_pickle.Builder(".".join(key), _plain_mapping, "class")
       for key in _HAIKU_MAPPINGS},
}


def read_official_checkpoint(path: epath.PathLike) -> tuple[dict[str, Any], str]:
    """The file's content as plain containers of arrays, and its sha256.

    Raises :class:`UnsafePickleError` for anything the reader refuses and
    :class:`OfficialCheckpointError` for a file that is not a release checkpoint."""
    try:
        content, digest = safe_pickle.read_pickle_file(os.fspath(path), allowed=ALLOWED_GLOBALS)
    except UnsafePickleError:
        raise
    except safe_pickle.PickleReadError as error:
        raise OfficialCheckpointError(str(error)) from None
    source = shown(os.fspath(path))
    if type(content) is not dict or "experiment_state" not in content:
        keys = (f"[{', '.join(ascii(key) for key in sorted(map(str, content)))}]"
                if type(content) is dict else safe_pickle.describe(content))
        raise OfficialCheckpointError(f"{source}: expected dict(experiment_state=..., step=..., "
                                      f"rng=...) of the official checkpointing, got {keys}")
    return content, digest


def _haiku_tree(tree: Any, what: str) -> dict[str, dict[str, Any]]:
    """``{module: {name: array}}`` with string keys, checked: the only shape of a Haiku tree."""
    if type(tree) is not dict:
        raise OfficialCheckpointError(f"{what} is {safe_pickle.describe(tree)}, not a Haiku "
                                      "mapping of modules")
    for module, entries in tree.items():
        if type(module) is not str or type(entries) is not dict:
            raise OfficialCheckpointError(f"{what}: entry {shown(module)} is not a module name "
                                          "with a mapping of arrays")
        for name, value in entries.items():
            if type(name) is not str or not isinstance(value, np.ndarray):
                raise OfficialCheckpointError(f"{what}: {shown(module)}/{shown(name)} is "
                                              f"{safe_pickle.describe(value)}, not an array")
    return tree


# -- Haiku names -> our modules ---------------------------------------------------------------

def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _batchnorm(module: str, ours: tuple) -> dict[tuple, tuple]:
    """Our BatchNorm paths -> (params or state, Haiku module, Haiku name) for one hk.BatchNorm."""
    sources = {(*ours, mine): ("params", module, theirs) for theirs, mine in _HAIKU_BN.items()}
    sources.update({(*ours, mine): ("state", f"{module}{TORSO_SEPARATOR}{ema}", "average")
                    for ema, mine in _HAIKU_EMA.items()})
    return sources


def _encoder_sources(torso: str, depth_blocks: list[list[int]], *,
                     bottleneck: bool) -> dict[tuple, tuple]:
    """Our encoder paths -> Haiku sources for ``ResNetTorso`` (initial conv + BN, then
    ``BlockGroup`` i / block j / conv_k, batchnorm_k, shortcut_conv, shortcut_batchnorm)."""
    sep = TORSO_SEPARATOR
    sources = {("stem_conv", "kernel"): ("params", f"{torso}{sep}initial_conv", "w")}
    sources.update(_batchnorm(f"{torso}{sep}initial_batchnorm", ("stem_norm",)))
    index = 0
    convs = 3 if bottleneck else 2
    for group, blocks in enumerate(depth_blocks):
        for block in blocks:
            module = f"{torso}{sep}block_group_{group}{sep}block_{block}"
            for layer in range(convs):
                sources[("blocks", index, "convs", layer, "kernel")] = (
                    "params", f"{module}{sep}conv_{layer}", "w")
                sources.update(_batchnorm(f"{module}{sep}batchnorm_{layer}",
                                          ("blocks", index, "norms", layer)))
            if block == 0:
                sources[("blocks", index, "shortcut_conv", "kernel")] = (
                    "params", f"{module}{sep}shortcut_conv", "w")
                sources.update(_batchnorm(f"{module}{sep}shortcut_batchnorm",
                                          ("blocks", index, "shortcut_norm")))
            index += 1
    return sources


def _mlp_sources(name: str) -> dict[tuple, tuple]:
    """The official two-layer ``MLP`` (Linear+bias, BatchNorm, ReLU, Linear) as our ``MLP``.

    The official ``MLP`` makes its layers inside ``__call__``, so Haiku joins their names with
    ``/`` (``projector/linear``), not the ``/~/`` of layers made in a constructor."""
    sources = {("hidden", 0, "kernel"): ("params", f"{name}/linear", "w"),
               ("hidden", 0, "bias"): ("params", f"{name}/linear", "b"),
               ("output", "kernel"): ("params", f"{name}/linear_1", "w")}
    sources.update(_batchnorm(f"{name}/batch_norm", ("norms", 0)))
    return sources


_BLOCK = re.compile(
    r"^(?P<torso>[^/]+)/~/block_group_(?P<group>\d{1,4})/~/block_(?P<block>\d{1,4})/~/")


def _registered_resnets() -> dict[str, dict[str, Any]]:
    """Every registered encoder made by a ``functools.partial`` whose keywords give a ResNet
    layout (``blocks_per_stage``, ``bottleneck``, ``stage_channels``, and ``stem_channels`` or
    the constructor's default): the networks an official torso can be mapped onto."""
    layouts = {}
    for name in ENCODERS:
        constructor = ENCODERS.get(name)
        keywords = getattr(constructor, "keywords", None) or {}
        if not isinstance(constructor, functools.partial) or not {
                "blocks_per_stage", "bottleneck", "stage_channels"} <= set(keywords):
            continue
        target = constructor.func
        signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
        stem = keywords.get("stem_channels", signature.parameters.get(
            "stem_channels", inspect.Parameter).default)
        if isinstance(stem, int):
            layouts[name] = {"blocks_per_stage": tuple(keywords["blocks_per_stage"]),
                             "bottleneck": bool(keywords["bottleneck"]),
                             "stage_channels": tuple(keywords["stage_channels"]),
                             "stem_channels": stem}
    return layouts


def _dense_outputs(params: Mapping[str, Any], module: str) -> int:
    """The output size of the Haiku ``Linear`` ``module``, checked to be 1 to MAX_HEAD_WIDTH."""
    entries = params.get(module)
    if not isinstance(entries, Mapping) or "w" not in entries:
        raise OfficialCheckpointError(f"missing: params {module}/w (the official online network "
                                      "has a projector, a predictor and a classifier)")
    shape = tuple(int(size) for size in np.shape(entries["w"]))
    if len(shape) != 2 or not 1 <= shape[1] <= MAX_HEAD_WIDTH:
        raise OfficialCheckpointError(f"params {module}/w has shape {shape}: a Linear layer's "
                                      f"(inputs, outputs) with 1 to {MAX_HEAD_WIDTH} outputs")
    return shape[1]


def describe_architecture(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Our ``config.model`` for the network the Haiku parameter names and shapes describe,
    checked against the encoder registry (layout, width 1-4), head sizes and
    :data:`MAX_PARAMETERS` from the shapes alone (modules traced shape-only, nothing allocated)."""
    torsos = sorted({key.split(TORSO_SEPARATOR)[0] for key in params
                     if key.endswith(f"{TORSO_SEPARATOR}initial_conv")})
    if len(torsos) != 1:
        raise OfficialCheckpointError(
            f"expected one ResNet torso with an initial_conv, found "
            f"{[shown(torso) for torso in torsos] or 'none'} among "
            f"{[shown(key) for key in sorted(params)[:8]]}...")
    torso = torsos[0]
    blocks: dict[int, set[int]] = collections.defaultdict(set)
    bottleneck = False
    for key in params:
        if (match := _BLOCK.match(key)) and match["torso"] == torso:
            blocks[int(match["group"])].add(int(match["block"]))
            bottleneck |= key.endswith(f"{TORSO_SEPARATOR}conv_2")
    blocks_per_stage = tuple(len(blocks[group]) for group in sorted(blocks))
    stem_module = f"{torso}{TORSO_SEPARATOR}initial_conv"
    stem_shape = tuple(int(size) for size in np.shape(params[stem_module].get("w", ())))
    if len(stem_shape) != 4 or stem_shape[:3] != (7, 7, 3):
        raise OfficialCheckpointError(f"params {shown(stem_module)}/w has shape {stem_shape}, "
                                      "expected (7, 7, 3, channels): the official ImageNet stem")
    stem_width = stem_shape[-1]
    layouts = _registered_resnets()
    matches = [(name, stem_width // layout["stem_channels"]) for name, layout in layouts.items()
               if (layout["blocks_per_stage"], layout["bottleneck"]) == (blocks_per_stage,
                                                                         bottleneck)
               and stem_width % layout["stem_channels"] == 0
               and 1 <= stem_width // layout["stem_channels"] <= max(WIDTH_MULTIPLIERS)]
    if not matches:
        known = ", ".join(f"{name} (stem {layout['stem_channels']} x width)"
                          for name, layout in layouts.items())
        raise OfficialCheckpointError(
            f"torso {shown(torso)}: {blocks_per_stage} {'bottleneck' if bottleneck else 'basic'}"
            f" blocks per stage, {stem_width} stem channels: not a ResNet this project builds at "
            f"width 1-{max(WIDTH_MULTIPLIERS)} ({known})")
    name, width = matches[0]
    projector = (_dense_outputs(params, "projector/linear"),
                 _dense_outputs(params, "projector/linear_1"))
    predictor_hidden = _dense_outputs(params, "predictor/linear")
    num_classes = _dense_outputs(params, "classifier") if "classifier" in params else 0
    model = base_config().model.to_dict()
    model["encoder"].update(name=name, width_multiplier=width, stem="imagenet",
                            zero_init_residual=False)
    model["projector"].update(hidden_size=projector[0], output_size=projector[1], depth=2)
    model["predictor"].update(hidden_size=predictor_hidden, depth=2, kind="mlp")
    count = parameter_count(model, num_classes=num_classes)  # shapes only
    if count > MAX_PARAMETERS:
        raise OfficialCheckpointError(
            f"{name} x{width} with a projector {projector[0]}/{projector[1]}, a predictor "
            f"{predictor_hidden} and {num_classes} classes has {count:,} numbers, more than the "
            f"{MAX_PARAMETERS:,} of the largest network of the paper (Table 9) with its heads")
    return {"model": model, "torso": torso, "bottleneck": bottleneck,
            "blocks": [sorted(blocks[group]) for group in sorted(blocks)],
            "num_classes": num_classes, "parameters": count}


def _weight_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a weight: not real floating point, or not finite."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or np.dtype(dtype).kind != "f":
        return f"has dtype {dtype}: weights must be real floating point"
    if isinstance(value, np.ndarray) and not np.isfinite(value).all():
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        return f"has {bad} non-finite value(s) (NaN or infinity)"
    return None


def map_official(params: Mapping[str, Mapping[str, Any]], state: Mapping[str, Mapping[str, Any]],
                 *, abstract: bool = False) -> tuple[dict[str, Any], dict[str, nnx.Module]]:
    """The Haiku ``params`` / ``state`` of the official online network as our modules.

    Returns the ``config.model`` and the modules (``encoder``, ``projector``, ``predictor``,
    and ``classifier`` when present). ``abstract``: leaves may be ``jax.ShapeDtypeStruct``; only
    names and shapes are checked and the modules are shape-only (a ResNet-200 2x without
    allocating it). Otherwise the shape-only modules are filled with the file's arrays: every
    leaf comes from the file, so nothing is randomly initialised (or compiled) first. Raises
    :class:`OfficialCheckpointError` listing missing, extra, misshapen and non-finite or
    non-real entries; the architecture is checked before anything is built.
    """
    arch = describe_architecture(params)
    model = arch["model"]
    encoder = encoder_from_model_config(model, abstract=True)
    modules = {"encoder": encoder, **heads_from_model_config(
        model, encoder.num_features, num_classes=arch["num_classes"], abstract=True)}
    plan = {"encoder": _encoder_sources(arch["torso"], arch["blocks"],
                                        bottleneck=arch["bottleneck"]),
            "projector": _mlp_sources("projector"), "predictor": _mlp_sources("predictor")}
    if arch["num_classes"]:
        plan["classifier"] = {("kernel",): ("params", "classifier", "w"),
                              ("bias",): ("params", "classifier", "b")}
    trees = {"params": params, "state": state}
    used = {("params", module, name) for module, entries in params.items() for name in entries}
    used |= {("state", module, name) for module, entries in state.items() for name in entries}
    problems, arrays = [], {}
    for head, sources in plan.items():
        ours = _flatten(nnx.to_pure_dict(nnx.state(modules[head])))
        arrays[head] = {}
        for path in sorted(set(ours) - set(sources), key=str):
            problems.append(f"missing: no official array for our {head}.{_dotted(path)}")
        for path, (kind, module, name) in sources.items():
            if path not in ours:
                continue  # its array stays unconsumed: reported as extra below
            used.discard((kind, module, name))
            value = trees[kind].get(module, {}).get(name)
            if value is None:
                problems.append(f"missing: {kind} {shown(f'{module}/{name}')} (our "
                                f"{head}.{_dotted(path)})")
                continue
            target = ours[path].shape
            if int(np.prod(np.shape(value))) != int(np.prod(target)) or \
                    tuple(d for d in np.shape(value) if d != 1) != tuple(d for d in target
                                                                          if d != 1):
                problems.append(f"shape: {kind} {shown(f'{module}/{name}')} is "
                                f"{tuple(np.shape(value))}, our {head}.{_dotted(path)} is "
                                f"{tuple(target)}")
                continue
            if (problem := _weight_problem(value)) is not None:
                problems.append(f"value: {kind} {shown(f'{module}/{name}')} {problem}")
                continue
            arrays[head][path] = value
    # The EMA's "hidden" copy and step counter of hk.BatchNorm's state: not parameters (the
    # official code reads "average"); consumed without mapping.
    used = {entry for entry in used if not (entry[0] == "state" and entry[2] in
                                             ("hidden", "counter"))}
    problems += [f"extra: {kind} {shown(f'{module}/{name}')} is mapped to nothing"
                 for kind, module, name in sorted(used, key=str)]
    if problems:
        raise OfficialCheckpointError(
            f"{len(problems)} mismatch(es) between the checkpoint and "
            f"{model['encoder']['name']} x{model['encoder']['width_multiplier']}: "
            + "; ".join(problems[:12]) + ("; ..." if len(problems) > 12 else ""))
    if not abstract:
        for head, values in arrays.items():
            state_of = nnx.state(modules[head])
            pure = nnx.to_pure_dict(state_of)
            for path, value in values.items():
                *parents, leaf = path
                node = pure
                for part in parents:
                    node = node[part]
                node[leaf] = jnp.asarray(np.asarray(value, np.float32).reshape(
                    node[leaf].shape))
            nnx.replace_by_pure_dict(state_of, pure)
            nnx.update(modules[head], state_of)
    return model, modules


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def import_official(checkpoint: epath.PathLike) -> PretrainedEncoder:
    """An official BYOL checkpoint -> :class:`PretrainedEncoder` with its heads and provenance
    (file, sha256, step, source), ready for :func:`byol_flax.export.encoder.export_encoder`."""
    path = os.path.abspath(os.fspath(checkpoint))
    source = shown(path)
    content, sha256 = read_official_checkpoint(path)
    state = content["experiment_state"]
    if not isinstance(state, ExperimentState):
        raise OfficialCheckpointError(
            f"{source}: experiment_state is {safe_pickle.describe(state)}, not the official "
            "_ByolExperimentState (online_params, target_params, online_state, ...)")
    params = _haiku_tree(state.online_params, f"{source}: online_params")
    bn_state = _haiku_tree(state.online_state, f"{source}: online_state")
    step = content.get("step")
    if isinstance(step, np.ndarray) and step.shape == ():
        step = step[()]
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | np.integer)):
        raise OfficialCheckpointError(f"{source}: step is {safe_pickle.describe(step)}, not an "
                                      "integer")
    try:
        model, modules = map_official(params, bn_state)
    except OfficialCheckpointError as error:
        raise OfficialCheckpointError(f"{source}: {error}") from None
    except MemoryError:  # within MAX_PARAMETERS, but more than this machine has
        raise OfficialCheckpointError(f"{source}: the network does not fit in this machine's "
                                      "memory") from None
    origin = {"kind": "official", "path": path, "sha256": sha256,
              "step": int(step) if step is not None else None, "source": SOURCE,
              "fingerprint": fingerprint(modules["encoder"])}
    return PretrainedEncoder(modules.pop("encoder"), model, origin, None, **modules)
