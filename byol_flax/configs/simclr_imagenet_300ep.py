"""python -m byol_flax.main --config=simclr_imagenet_300ep:r50x1 --workdir=gs://BUCKET/simclr_300ep --config.data.dir=gs://BUCKET/imagenet_arrayrecord

Section 5's SimCLR baseline (Appendix G.5) in the BYOL code: no predictor, the online network as
its own target with the gradient flowing through it, and Eq. 5 with beta = 1 at alpha = 0.1,
i.e. SimCLR's InfoNCE (Eq. 10) x 2 alpha; projector 4096 -> 256 and everything else as the
300-epoch BYOL base (LARS, LR 0.3, weight decay 1e-6). Table 19 reports 69.4% top-1.
"""

import ml_collections

from byol_flax.config import SIMCLR, set_dotted
from byol_flax.configs import byol_imagenet_300ep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = byol_imagenet_300ep.get_config(arg)
    for key, value in SIMCLR.items():
        set_dotted(config, key, value, origin="simclr_imagenet_300ep")
    return config
