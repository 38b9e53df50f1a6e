"""python -m byol_flax.evaluation --config=eval_digits:linear --source=workdirs/digits --workdir=workdirs/digits_eval/linear

The evaluation protocols on the bundled digits
(``byol_flax.data.convert.digits --holdout-count 150``): fit on
``train`` (1287 images), choose on ``holdout`` (150), report on ``test`` (360), at the demo's
16 px. The paper's hyper-parameter grids are kept; the batch is the CPU demo's 256 and the linear
classifier is trained on precomputed features (no augmentation) unless overridden with
``--config.linear.augment=spatial``. Argument:
``<protocol>[,data=DIR][,image_size=N][,feature_norm=none|batchnorm][,smoke=True]``
with protocol one of linear, semi_supervised, transfer_linear, transfer_finetune, knn;
``image_size`` is the pre-training's crop size (12 for ``digits_cpu.py``'s ``small_image``
recipe); ``feature_norm`` is ``linear.feature_norm`` (``batchnorm``: the ViT probe, beside the
paper's).
"""

import ml_collections

from byol_flax.configs import common, digits_cpu
from byol_flax.evaluation.config import FEATURE_NORMS, PROTOCOLS, eval_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, positional="protocol", protocol="linear", data="data/digits",
                               image_size=digits_cpu.IMAGE_SIZE, feature_norm="none",
                               choices={"protocol": PROTOCOLS, "feature_norm": FEATURE_NORMS})
    config = eval_base_config()
    config.protocol = options.protocol
    config.data.dir = options.data
    config.data.image_size = options.image_size
    config.data.num_classes = 10
    config.data.source_image_size = (8, 8)
    config.data.worker_count = 0
    config.data.read_threads = 2
    config.augment.blur_kernel_divider = digits_cpu.BLUR_KERNEL_DIVIDER
    config.feature_batch_size = 256
    config.linear.augment = "none"
    config.linear.batch_size = 256
    config.linear.feature_norm = options.feature_norm
    config.semi_supervised.label_fraction = 0.1
    config.semi_supervised.batch_size = 128
    config.semi_supervised.epochs = (30,)
    config.transfer_finetune.batch_size = 128
    config.transfer_finetune.steps = 200
    config.knn.k = (20,)
    return common.finish(config, options)
