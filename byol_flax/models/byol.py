"""The online network (f, g, q) and target network (f, g) of BYOL (Section 3, Appendix A)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from byol_flax.models.encoders import ENCODER_CONTEXT, ENCODER_OPTIONS, build_encoder
from byol_flax.models.heads import MLP
from byol_flax.models.predictors import apply_predictor, build_predictor
from byol_flax.models.resnet import CONV_INIT, BatchNormConfig


class ByolNetwork(nnx.Module):
    """Encoder + projector (+ predictor on the online side only).

    Calling it returns the representation y and the projection z; :meth:`predict` applies the
    predictor, which may need the target projections (batch-fitted variants, Appendix J.2).
    The target network is the same class without a predictor.
    """

    def __init__(self, encoder: nnx.Module, projector: nnx.Module,
                 predictor: nnx.Module | None = None):
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        representation = self.encoder(images)
        projection = self.projector(representation)
        return {"representation": representation, "projection": projection}

    def predict(self, projection: jax.Array, target_projection: jax.Array) -> jax.Array:
        """q(z), the prediction of ``target_projection`` (the other view's target output)."""
        return apply_predictor(self.predictor, projection, target_projection)


def _batchnorm_and_dtype(config: ConfigDict) -> tuple[BatchNormConfig, Any]:
    return (BatchNormConfig(decay=config.batchnorm.decay, eps=config.batchnorm.eps),
            jnp.dtype(config.get("compute_dtype", "float32")))


def build_encoder_from_config(config: ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """The encoder f of the ``model`` section of a config."""
    bn, dtype = _batchnorm_and_dtype(config)
    encoder = config.encoder
    options = {key: encoder.get(key, default) for key, default in ENCODER_OPTIONS.items()}
    options["conv_implementation"] = config.get("conv_implementation", "auto")
    options.update({key: encoder[key] for key in ENCODER_CONTEXT if key in encoder})
    return build_encoder(encoder.name, width_multiplier=encoder.width_multiplier,
                         stem=encoder.stem, bn=bn, dtype=dtype, rngs=rngs, **options)


def build_heads(config: ConfigDict, num_features: int, *, rngs: nnx.Rngs
                ) -> tuple[nnx.Module, nnx.Module]:
    """The projector g and predictor q of the ``model`` section of a config, on an encoder of
    ``num_features`` outputs."""
    bn, dtype = _batchnorm_and_dtype(config)
    projector = MLP(num_features, hidden_size=config.projector.hidden_size,
                    output_size=config.projector.output_size, depth=config.projector.depth,
                    bn=bn, dtype=dtype, rngs=rngs)
    predictor = build_predictor(config.predictor, features=config.projector.output_size, bn=bn,
                                dtype=dtype, rngs=rngs)
    return projector, predictor


def build_online_classifier(num_features: int, num_classes: int, *, rngs: nnx.Rngs
                            ) -> nnx.Linear:
    """The official implementation's online classifier: a linear layer on the representation."""
    return nnx.Linear(num_features, num_classes, kernel_init=CONV_INIT, rngs=rngs)


def build_online_network(config: ConfigDict, *, rngs: nnx.Rngs) -> ByolNetwork:
    """Builds the online network from the ``model`` section of a config."""
    encoder = build_encoder_from_config(config, rngs=rngs)
    return ByolNetwork(encoder, *build_heads(config, encoder.num_features, rngs=rngs))


def target_from_online(online: ByolNetwork) -> ByolNetwork:
    """The target network: an exact copy of the online encoder and projector (Appendix J.5).

    The arrays are copied, not shared, so the state can be donated to a jitted step.
    """
    target = nnx.clone(ByolNetwork(online.encoder, online.projector))
    nnx.update(target, jax.tree.map(jnp.copy, nnx.state(target)))
    return target


def count_params(module: Any) -> int:
    """Number of trainable parameters (``nnx.Param``); BatchNorm running statistics excluded."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
