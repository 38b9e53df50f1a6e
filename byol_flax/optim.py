"""LARS as the paper and the official code run it, assembled from optax primitives; AdamW for
Vision Transformers (MoCo v3's recipe), from optax.

Appendix A: LARS (trust coefficient 1e-3, momentum 0.9), weight decay 1.5e-6, biases and BatchNorm
parameters excluded from both the trust-ratio adaptation and weight decay. Appendix J.1: the
predictor's and projector's learning rates are multiplied by lambda and mu.

The transforms are optax's own, chained in the order of the official BYOL implementation:
weight decay -> trust ratio -> momentum -> learning rate. (``optax.lars`` scales by the learning
rate *before* the momentum trace, which differs from the paper's optimizer whenever the learning
rate changes, i.e. at every step of the warm-up and cosine schedule.)
"""

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from ml_collections import ConfigDict

# Modules whose parameters are "batch normalization parameters" in the sense of Appendix A; the
# other normalisations are listed so that a variant that uses them gets the same treatment.
NORM_TYPES = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)

ParamPath = tuple[str, ...]


def _path_names(key_path: tuple[Any, ...]) -> ParamPath:
    """A pytree key path of an ``nnx.State`` leaf as plain names, e.g.
    ('encoder', 'blocks', '0')."""
    names = []
    for key in key_path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue  # the Variable's own array slot
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(names)


def norm_module_paths(model: nnx.Module) -> frozenset[ParamPath]:
    """Paths of all normalisation layers in ``model``."""
    return frozenset(tuple(str(p) for p in path) for path, node in nnx.iter_graph(model)
                     if isinstance(node, NORM_TYPES))


def undecayed_leaf_paths(model: nnx.Module) -> frozenset[ParamPath]:
    """Paths of the leaves modules name in their ``no_weight_decay`` attribute (a ViT's class
    token and position embedding, as timm excludes them)."""
    return frozenset((*(str(p) for p in path), name) for path, node in nnx.iter_graph(model)
                     if isinstance(node, nnx.Module)
                     for name in getattr(node, "no_weight_decay", ()))


def decay_and_adaptation_mask(model: nnx.Module) -> Callable[[Any], Any]:
    """Mask fn for optax: True for leaves that get weight decay and LARS adaptation.

    False for biases (any leaf named ``bias``), for every parameter of a normalisation layer,
    and for the leaves a module lists in ``no_weight_decay``.
    """
    norm_paths = norm_module_paths(model)
    undecayed = undecayed_leaf_paths(model)

    def is_adapted(path: ParamPath) -> bool:
        return path[-1] != "bias" and path[:-1] not in norm_paths and path not in undecayed

    return lambda params: jax.tree_util.tree_map_with_path(
        lambda key_path, _: is_adapted(_path_names(key_path)), params)


def module_label(path: ParamPath) -> str:
    """The top-level part of the online network a parameter belongs to (for LR multipliers)."""
    return path[0] if path and path[0] in ("predictor", "projector") else "other"


OPTIMIZERS = ("lars", "adamw")


def build_optimizer(config: ConfigDict, model: nnx.Module,
                    learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """From ``config.optimizer``: LARS (``kind="lars"``, the paper's) or AdamW (``"adamw"``, MoCo
    v3's for ViTs), with the paper's exclusions from weight decay (and from LARS adaptation) and
    per-module LR multipliers."""
    mask: Any = decay_and_adaptation_mask(model) if config.exclude_bias_and_norm else True
    if config.kind == "lars":
        transforms = (
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=config.trust_coefficient),
                         mask),
            optax.trace(decay=config.momentum, nesterov=False),
            optax.scale_by_learning_rate(learning_rate),
        )
    elif config.kind == "adamw":  # decoupled weight decay, scaled by the LR (PyTorch's AdamW)
        transforms = (optax.adamw(learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                                  eps=config.adam_eps, weight_decay=config.weight_decay,
                                  mask=mask),)
    else:
        raise ValueError(f"optimizer.kind must be one of {list(OPTIMIZERS)}, got {config.kind!r}")
    multipliers = {"predictor": config.predictor_lr_multiplier,
                   "projector": config.projector_lr_multiplier, "other": 1.0}
    return optax.chain(*transforms, scale_by_module(multipliers))


def scale_by_module(multipliers: dict[str, float]) -> optax.GradientTransformation:
    """Per-module learning-rate multipliers (lambda, mu) as a stateless transform.

    Stateless and always present, so the optimizer state has one structure whatever the
    multipliers are: changing them on resume is a config change, not another checkpoint layout.
    A multiplier of 1 leaves the updates bitwise unchanged.
    """
    def scale(updates: Any, params: Any = None) -> Any:
        del params
        return jax.tree_util.tree_map_with_path(
            lambda key_path, update: update * multipliers[module_label(_path_names(key_path))],
            updates)

    return optax.stateless(scale)
