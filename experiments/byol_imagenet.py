"""python -m byol_flax.main --config=experiments/byol_imagenet.py:r50x1 --workdir=gs://BUCKET/byol_r50x1 --config.data.dir=gs://BUCKET/imagenet_arrayrecord

BYOL on ImageNet with the hyper-parameters of Section 4 and Appendix J.1: 1000 epochs at batch
4096, LARS (eta 1e-3, momentum 0.9), base LR 0.2 x batch/256 with 10 warm-up epochs and cosine
decay, weight decay 1.5e-6, tau_base 0.996, BatchNorm decay 0.9 / eps 1e-5, seed 1337.

The argument picks an encoder of Table 9: ``r<depth>x<width>``, e.g. ``r50x1`` (the default),
``r200x2``, ``r50x4``. Data: ``python -m data_prep.image_folder --layout imagenet
--imagenet-holdout`` writes ``train`` (1271158 images), ``holdout`` (10009, Appendix D.1) and
``validation``; steps per epoch still use the full 1281167 images, as the paper's HPS do.
"""

import re

import ml_collections

from byol_flax.config import IMAGENET_TRAIN_EXAMPLES, base_config

TABLE_9_ENCODERS = ("r50x1", "r101x1", "r152x1", "r200x1", "r50x2", "r101x2", "r50x3", "r152x2",
                    "r200x2", "r50x4", "r101x3", "r152x3")


def parse_encoder(arg: str | None) -> tuple[str, int]:
    """``"r200x2"`` -> ("resnet200", 2)."""
    match = re.fullmatch(r"r(\d+)x(\d)", arg or "r50x1")
    if not match:
        raise ValueError(f"config argument {arg!r} is not an encoder like 'r50x1'; "
                         f"Table 9 has {TABLE_9_ENCODERS}")
    return f"resnet{match.group(1)}", int(match.group(2))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()  # the defaults are Appendix J.1
    config.model.encoder.name, config.model.encoder.width_multiplier = parse_encoder(arg)
    config.training.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    config.data.num_classes = 1000
    return config
