"""python -m byol_flax.main --config=byol_imagenet_300ep:r50x1 --workdir=gs://BUCKET/byol_300ep --config.data.dir=gs://BUCKET/imagenet_arrayrecord

The 300-epoch base of the ablations in Section 5 / Appendix G: base LR 0.3, weight decay 1e-6,
tau_base 0.99, batch 4096; the rest as Appendix J.1. The argument is ``byol_imagenet.py``'s.
"""

import ml_collections

from byol_flax.configs import byol_imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = byol_imagenet.get_config(arg, epochs=300.0)
    config.optimizer.base_learning_rate = 0.3
    config.optimizer.weight_decay = 1e-6
    config.target.base_ema = 0.99
    return config
