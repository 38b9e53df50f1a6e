"""Encoders, projection/prediction heads and the BYOL online/target networks."""

from byol_flax.models.byol import (
    ByolNetwork,
    build_online_network,
    count_params,
    target_from_online,
)
from byol_flax.models.encoders import ENCODERS, build_encoder
from byol_flax.models.heads import MLP
from byol_flax.models.resnet import BatchNormConfig, ResNet
from byol_flax.models.vit import VisionTransformer

__all__ = [
    "ENCODERS", "MLP", "BatchNormConfig", "ByolNetwork", "ResNet", "build_encoder",
    "build_online_network", "count_params", "target_from_online", "VisionTransformer",
]
