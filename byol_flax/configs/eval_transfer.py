"""python -m byol_flax.evaluation --config=eval_transfer:linear,dataset=aircraft --source=gs://BUCKET/byol_r50x1 --workdir=gs://BUCKET/eval/r50x1_aircraft --config.data.dir=/data/aircraft_arrayrecord

Transfer to the datasets of Table 10 (Appendix E): ``linear`` is E.2 (frozen features without
augmentation, shorter side resized to 224, L-BFGS logistic regression over 45 l2 values in
[1e-6, 1e5], refit on train + validation); ``finetune`` is E.3 (20000 steps at batch 256, 7 LRs x
8 weight decays, BatchNorm decay max(1 - 10/s, 0.9), refit on train + validation). The dataset
sets the number of classes and the metric of Table 10. Convert a dataset with
``byol_flax.data.convert`` so it
has ``train``, ``holdout`` (the validation examples of Table 10) and ``test`` splits. Argument:
``MODE[,dataset=NAME][,smoke=True]``, mode ``linear`` (default) or ``finetune``, dataset
(default ``cifar10``) one of Table 10's.
"""

import ml_collections

from byol_flax.configs import common
from byol_flax.evaluation.config import eval_base_config

# Table 10: classes and accuracy measure (PASCAL VOC's mAP is not a classification accuracy of
# this protocol and is not listed).
TABLE_10 = {
    "food101": (101, "top1"), "cifar10": (10, "top1"), "cifar100": (100, "top1"),
    "birdsnap": (500, "top1"), "sun397": (397, "top1"), "cars": (196, "top1"),
    "aircraft": (100, "mean_per_class"), "dtd": (47, "top1"), "pets": (37, "mean_per_class"),
    "caltech101": (101, "mean_per_class"), "flowers": (102, "mean_per_class"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, positional="mode", mode="linear", dataset="cifar10",
                               choices={"mode": ("linear", "finetune"),
                                        "dataset": sorted(TABLE_10)})
    num_classes, metric = TABLE_10[options.dataset]
    config = eval_base_config()
    config.name = f"{options.mode}_{options.dataset}"
    config.protocol = f"transfer_{options.mode}"
    config.data.num_classes = num_classes
    config.transfer_linear.metric = metric
    config.transfer_finetune.metric = metric
    return common.finish(config, options)
