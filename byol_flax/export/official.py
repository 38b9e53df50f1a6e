"""Import the checkpoints of the official BYOL release into this project's export format.

DeepMind released ``pretrain_res50x1.pkl`` and ``pretrain_res200x2.pkl`` with the paper
(google-deepmind/deepmind-research, ``byol/``). Its ``utils/checkpointing.py`` writes them as a
dill pickle (protocol 2) of ``dict(experiment_state=..., step=..., rng=...)``: the experiment
state is a NamedTuple (``byol.byol_experiment._ByolExperimentState``) of online and target
parameters, BatchNorm states and the optimizer state, each a Haiku mapping
``{"module/~/path": {"w" | "b" | "scale" | "offset" | ...: array}}`` of NumPy arrays taken from
device 0.

Nothing in the file is executed. :class:`RestrictedUnpickler` resolves only the globals of
:data:`ALLOWED_GLOBALS`: NumPy's array reconstruction, the latin-1 codec protocol 2 stores bytes
with, and the NamedTuple and mapping classes of that layout, each mapped *by name* to a plain
container defined here. Any other global (``os.system``, a class of any other module) is refused
with an error that names it, before anything is called.

The online encoder, projector and predictor (and the online classifier) are mapped onto this
project's modules name by name; every array must be consumed and every parameter of our modules
filled, with equal shapes, or the import fails listing what is missing, extra or misshapen.
``tests/test_official_weights.py`` checks the mapped network against a Haiku build of the
official one (ResNet-18 and ResNet-50 outputs equal, ResNet-200 2x names and shapes).

Usage::

    byol-import-official --checkpoint=pretrain_res50x1.pkl --out=exports/byol_r50x1_official
    byol-evaluate --config=eval_imagenet:linear --source=exports/byol_r50x1_official ...
"""

import collections
import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from etils import epath
from flax import nnx

from byol_flax.errors import UserError
from byol_flax.config import base_config
from byol_flax.export.encoder import (PretrainedEncoder, encoder_from_model_config, fingerprint,
                                      heads_from_model_config)
from byol_flax.models.resnet import ENCODERS

SOURCE = ("BYOL official release: google-deepmind/deepmind-research byol/ (Grill et al., "
          "NeurIPS 2020), pre-trained on ImageNet ILSVRC-2012 train")
TORSO_SEPARATOR = "/~/"
_HAIKU_BN = {"scale": "scale", "offset": "bias"}  # hk.BatchNorm parameter -> nnx.BatchNorm
_HAIKU_EMA = {"mean_ema": "mean", "var_ema": "var"}  # hk.BatchNorm state -> nnx.BatchNorm


class OfficialCheckpointError(UserError, ValueError):
    """The file is not an official BYOL checkpoint this importer can map (the message says
    exactly what does not match)."""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing of it was run."""


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


def _plain_mapping(data: Mapping | None = None) -> dict:
    """Haiku's ``frozendict`` / ``FlatMapping`` pickle as ``(cls, (dict,))``: a plain dict."""
    if data is not None and not isinstance(data, Mapping):
        raise UnsafePickleError(f"a Haiku mapping was given {type(data).__name__}, not a mapping")
    return dict(data or {})


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 stores ``bytes`` as ``_codecs.encode(str, "latin1")``; no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} is not a bytes literal")
    return text.encode("latin1")


def _numpy_core(name: str) -> Any:
    """A function of NumPy's core (``numpy._core`` from NumPy 2, ``numpy.core`` before)."""
    core = getattr(np, "_core", None) or np.core
    module, _, attribute = name.rpartition(".")
    return getattr(getattr(core, module), attribute)


_OPTIMIZER_STATES = (
    ("byol.utils.optimizers", "ScaleByLarsState"),
    ("byol.utils.optimizers", "AddWeightDecayState"),
    ("optax._src.transform", "ScaleState"),
    ("optax._src.base", "EmptyState"),
)
_HAIKU_MAPPINGS = (("haiku._src.data_structures", "frozendict"),
                   ("haiku._src.data_structures", "FlatMapping"))

ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy_core("multiarray._reconstruct")
       for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _numpy_core("multiarray.scalar")
       for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numpy_core("numeric._frombuffer")
       for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("byol.byol_experiment", "_ByolExperimentState"): ExperimentState,
    **{key: OptimizerState for key in _OPTIMIZER_STATES},
    **{key: _plain_mapping for key in _HAIKU_MAPPINGS},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only arrays and plain containers; refuses every global not allowed by name."""

    def __init__(self, file: BinaryIO, *, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to load global {module}.{name}: an official BYOL "
                "checkpoint holds only arrays, Haiku mappings and the experiment-state "
                "NamedTuples (byol_flax.export.official.ALLOWED_GLOBALS)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused persistent id {pid!r}")


def read_official_checkpoint(path: epath.PathLike) -> tuple[dict[str, Any], str]:
    """The file's content as plain containers, and its sha256."""
    path = epath.Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
        with path.open("rb") as file:
            content = RestrictedUnpickler(file, source=str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise OfficialCheckpointError(f"{path}: not a readable pickle: {error}") from error
    if not isinstance(content, dict) or "experiment_state" not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise OfficialCheckpointError(f"{path}: expected dict(experiment_state=..., step=..., "
                                      f"rng=...) of the official checkpointing, got {keys}")
    return content, digest.hexdigest()


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


_BLOCK = re.compile(r"^(?P<torso>[^/]+)/~/block_group_(?P<group>\d+)/~/block_(?P<block>\d+)/~/")


def describe_architecture(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Our ``config.model`` for the network the Haiku parameter names and shapes describe."""
    torsos = sorted({key.split(TORSO_SEPARATOR)[0] for key in params
                     if key.endswith(f"{TORSO_SEPARATOR}initial_conv")})
    if len(torsos) != 1:
        raise OfficialCheckpointError(f"expected one ResNet torso with an initial_conv, found "
                                      f"{torsos or 'none'} among {sorted(params)[:8]}...")
    torso = torsos[0]
    blocks: dict[int, set[int]] = collections.defaultdict(set)
    bottleneck = False
    for key in params:
        if (match := _BLOCK.match(key)) and match["torso"] == torso:
            blocks[int(match["group"])].add(int(match["block"]))
            bottleneck |= key.endswith(f"{TORSO_SEPARATOR}conv_2")
    blocks_per_stage = tuple(len(blocks[group]) for group in sorted(blocks))
    stem_width = np.shape(params[f"{torso}{TORSO_SEPARATOR}initial_conv"]["w"])[-1]
    width, remainder = divmod(stem_width, 64)
    known = {(keywords["blocks_per_stage"], keywords["bottleneck"]): name
             for name in ENCODERS if name.startswith("resnet") and name[6:].isdigit()
             for keywords in [getattr(ENCODERS.get(name), "keywords", {})]}
    name = known.get((blocks_per_stage, bottleneck))
    if name is None or remainder or width < 1:
        raise OfficialCheckpointError(
            f"torso {torso!r}: {blocks_per_stage} {'bottleneck' if bottleneck else 'basic'} "
            f"blocks per stage, {stem_width} stem channels: not a ResNet this project builds "
            f"({', '.join(sorted(known.values()))}, width 1-4)")
    model = base_config().model.to_dict()
    model["encoder"].update(name=name, width_multiplier=width, stem="imagenet",
                            zero_init_residual=False)
    for head, config in (("projector", model["projector"]), ("predictor", model["predictor"])):
        hidden = np.shape(params.get(f"{head}/linear", {}).get("w", (0, 0)))
        output = np.shape(params.get(f"{head}/linear_1", {}).get("w", (0, 0)))
        config.update(hidden_size=int(hidden[-1]), depth=2)
        if head == "projector":
            config["output_size"] = int(output[-1])
    model["predictor"]["kind"] = "mlp"
    return {"model": model, "torso": torso, "bottleneck": bottleneck,
            "blocks": [sorted(blocks[group]) for group in sorted(blocks)],
            "num_classes": int(np.shape(params["classifier"]["w"])[-1])
            if "classifier" in params else 0}


def map_official(params: Mapping[str, Mapping[str, Any]], state: Mapping[str, Mapping[str, Any]],
                 *, abstract: bool = False) -> tuple[dict[str, Any], dict[str, nnx.Module]]:
    """The Haiku ``params`` / ``state`` of the official online network as our modules.

    Returns the ``config.model`` and the modules (``encoder``, ``projector``, ``predictor``,
    and ``classifier`` when present). ``abstract``: leaves may be ``jax.ShapeDtypeStruct``; only
    names and shapes are checked and the modules are shape-only (a ResNet-200 2x without
    allocating it). Raises :class:`OfficialCheckpointError` listing missing, extra and
    misshapen entries.
    """
    arch = describe_architecture(params)
    model = arch["model"]
    encoder = encoder_from_model_config(model, abstract=abstract)
    modules = {"encoder": encoder, **heads_from_model_config(
        model, encoder.num_features, num_classes=arch["num_classes"], abstract=abstract)}
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
                problems.append(f"missing: {kind} {module}/{name} (our {head}.{_dotted(path)})")
                continue
            target = ours[path].shape
            if int(np.prod(np.shape(value))) != int(np.prod(target)) or \
                    tuple(d for d in np.shape(value) if d != 1) != tuple(d for d in target
                                                                          if d != 1):
                problems.append(f"shape: {kind} {module}/{name} is {tuple(np.shape(value))}, "
                                f"our {head}.{_dotted(path)} is {tuple(target)}")
                continue
            arrays[head][path] = value
    # The EMA's "hidden" copy and step counter of hk.BatchNorm's state: not parameters (the
    # official code reads "average"); consumed without mapping.
    used = {entry for entry in used if not (entry[0] == "state" and entry[2] in
                                             ("hidden", "counter"))}
    problems += [f"extra: {kind} {module}/{name} is mapped to nothing"
                 for kind, module, name in sorted(used)]
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
                node[leaf] = np.asarray(value, np.float32).reshape(node[leaf].shape)
            nnx.replace_by_pure_dict(state_of, pure)
            nnx.update(modules[head], state_of)
    return model, modules


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def import_official(checkpoint: epath.PathLike) -> PretrainedEncoder:
    """An official BYOL checkpoint -> :class:`PretrainedEncoder` with its heads and provenance
    (file, sha256, step, source), ready for :func:`byol_flax.export.encoder.export_encoder`."""
    path = epath.Path(os.path.abspath(os.fspath(checkpoint)))
    content, sha256 = read_official_checkpoint(path)
    state = content["experiment_state"]
    try:
        params, bn_state = state.online_params, state.online_state
    except AttributeError:
        raise OfficialCheckpointError(
            f"{path}: experiment_state is a {type(state).__name__}, not the official "
            "_ByolExperimentState (online_params, target_params, online_state, ...)") from None
    try:
        model, modules = map_official(params, bn_state)
    except OfficialCheckpointError as error:
        raise OfficialCheckpointError(f"{path}: {error}") from None
    step = content.get("step")
    origin = {"kind": "official", "path": str(path), "sha256": sha256,
              "step": int(step) if step is not None else None, "source": SOURCE,
              "fingerprint": fingerprint(modules["encoder"])}
    return PretrainedEncoder(modules.pop("encoder"), model, origin, None, **modules)
