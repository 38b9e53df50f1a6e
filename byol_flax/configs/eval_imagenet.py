"""python -m byol_flax.evaluation --config=eval_imagenet:linear --source=gs://BUCKET/byol_r50x1 --workdir=gs://BUCKET/eval/r50x1_linear --config.data.dir=gs://BUCKET/imagenet_arrayrecord

The ImageNet protocols of Appendix D.1 on the shards of
``byol_flax.data.convert.image_folder --layout imagenet
--imagenet-holdout`` (a seeded choice of 10009; ``tfds_to_arrayrecord --imagenet-holdout`` gives the
paper's exact split): fit on ``train`` (1271158 images), choose on ``holdout`` (10009), report on
``validation`` (the public ILSVRC2012 validation set, the paper's test set). The argument:

* ``linear`` (default): frozen encoder, random crop + flip, SGD Nesterov 0.9, 80 epochs, batch
  1024, LR in {0.4, 0.3, 0.2, 0.1, 0.05}.
* ``linear_table7``: Table 7's variant, pre-training augmentations and tclip (alpha 20, beta 1e-2).
* ``semi_1pct`` / ``semi_10pct``: fine-tuning on a balanced 1% / 10% of the labels, LR in
  {0.01, 0.02, 0.05, 0.1, 0.005} x {30, 50} epochs. For the SimCLR subsets of Table 2 add
  ``--config.semi_supervised.split_file=1percent.txt``.
* ``knn``: weighted kNN (k 20 and 200, T 0.07).

``,smoke=True`` gives the seconds-long version (``byol_flax/configs/common.py``).
"""

import ml_collections

from byol_flax.configs import common
from byol_flax.evaluation.config import eval_base_config

VARIANTS = ("linear", "linear_table7", "semi_1pct", "semi_10pct", "knn")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, positional="variant", variant="linear",
                               choices={"variant": VARIANTS})
    variant = options.variant
    config = eval_base_config()
    config.name = variant
    config.data.num_classes = 1000
    config.data.test_split = "validation"
    if variant.startswith("linear"):
        config.protocol = "linear"
    if variant == "linear_table7":
        config.linear.augment = "pretrain"
        config.linear.tclip = True
    if variant.startswith("semi"):
        config.protocol = "semi_supervised"
        config.semi_supervised.label_fraction = 0.01 if variant == "semi_1pct" else 0.1
    if variant == "knn":
        config.protocol = "knn"
    return common.finish(config, options)
