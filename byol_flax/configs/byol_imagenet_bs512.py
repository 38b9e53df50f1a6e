"""python -m byol_flax.main --config=byol_imagenet_bs512:r50x1,slice=v3-8 --workdir=gs://BUCKET/byol_bs512 --config.data.dir=gs://BUCKET/imagenet_arrayrecord

Appendix H, training with a smaller batch: batch 512, base LR 0.4, tau_base 0.9995; everything
else as Section 4 / Appendix J.1 (see ``byol_imagenet.py``).
"""

import ml_collections

from byol_flax.configs import byol_imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = byol_imagenet.get_config(arg, batch_size=512)
    config.optimizer.base_learning_rate = 0.4
    config.target.base_ema = 0.9995
    return config
