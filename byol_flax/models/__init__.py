"""Encoders, projection/prediction heads and the BYOL online/target networks.

Where each part of the paper (Section 3.1, Algorithm 1, Appendix B) lives:

- encoder f: :mod:`~byol_flax.models.encoders` (the registry), :mod:`~byol_flax.models.resnet`,
  :mod:`~byol_flax.models.vit`;
- projector g (MLP 4096 -> 256): :class:`~byol_flax.models.heads.MLP`, built as ``projector``
  by :func:`byol_flax.models.byol.build_heads`;
- predictor q: :mod:`~byol_flax.models.predictors` (registry; the MLP by default);
- online network (f, g, q) and target network (f, g):
  :class:`~byol_flax.models.byol.ByolNetwork`, :func:`~byol_flax.models.byol.target_from_online`;
- target EMA (xi <- tau xi + (1 - tau) theta): ``byol_flax.train_state.TrainState.update_target``,
  its tau schedule ``byol_flax.schedules.target_ema_schedule``;
- online classifier (the linear head trained beside BYOL on stop-gradient representations):
  ``byol_flax.train_step.update_online_classifier`` (its update), ``byol_flax.evaluation.
  online_classifier`` (its monitor).

The parts stay where the step uses them (a move would split each from its callers); this map and
the README's "What is here" table are where a reader looks.
"""

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
