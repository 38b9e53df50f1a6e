"""Starting a new pre-training run from an export: ``config.model.init_from``.

The online encoder takes the export's arrays (weights and BatchNorm statistics), and so do the
projector and predictor when the export kept them and ``config.model.init_from_heads`` is set;
the target then becomes their exact copy, as at any step 0 (Appendix J.5), while the optimizer
state, the online classifier and the step start fresh. :func:`check_init_from` checks the export
against the config before data is opened or anything is compiled: it must exist, its encoder and
BatchNorm settings must be the config's, and heads that are loaded must have the config's shapes.

Only a new run is initialised: a resumed run's checkpoint holds the weights, so
:mod:`byol_flax.train` does not apply ``init_from`` then (and a resume may change the key).
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from byol_flax.checkpointing import flatten_dotted, layout_differences, stored_layout
from byol_flax.config import ConfigError
from byol_flax.export.encoder import (
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
from byol_flax.models.byol import build_online_network
from byol_flax.runtime import console
from byol_flax.train_state import TrainState

# What the export's encoder must share with config.model (dotted within it): the architecture,
# and the BatchNorm settings its running statistics were estimated with.
ARCHITECTURE_KEYS = ("encoder.name", "encoder.width_multiplier", "encoder.stem",
                     "batchnorm.decay", "batchnorm.eps")
LOADABLE_HEADS = ("projector", "predictor")  # the online classifier always starts fresh


class InitFromError(ConfigError):
    """``config.model.init_from`` names no export this config can start from."""


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A checked export to start from."""

    path: epath.Path
    meta: dict[str, Any]  # its encoder_config.json
    kept: tuple[str, ...]  # the loadable heads the export holds
    heads: tuple[str, ...]  # those to load (kept, and model.init_from_heads)


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
    """The export ``config.model.init_from`` names, checked against ``config.model`` without
    loading an array; raises :class:`InitFromError` in one line naming the key and what
    differs."""
    model = config.model
    key = f"config.model.init_from={model.init_from!r}"
    path = absolute_path(model.init_from)
    if not path.is_dir():
        where = "" if str(path) == model.init_from else f" ({path})"
        raise InitFromError(f"{key}: no such directory{where}")
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


def apply_init_from(state: TrainState, source: InitSource) -> dict[str, Any]:
    """Puts the export's arrays into a new run's ``state`` (of
    :func:`byol_flax.train_state.create_train_state`) and makes the target their copy; the
    optimizer state, classifier and step stay as built. Returns the provenance the run records
    (export path, encoder fingerprint, heads loaded, the export's origin)."""
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
