"""python -m byol_flax.evaluation --config=byol_flax/configs/eval_digits.py:linear --source=workdirs/digits --workdir=workdirs/digits_eval/linear

The evaluation protocols on the bundled digits (``byol_flax.data.convert.digits --holdout-count 150``): fit on
``train`` (1287 images), choose on ``holdout`` (150), report on ``test`` (360), at the demo's
16 px. The paper's hyper-parameter grids are kept; the batch is the CPU demo's 256 and the linear
classifier is trained on precomputed features (no augmentation) unless overridden with
``--config.linear.augment=spatial``. Argument: ``<protocol>[,data=DIR][,image_size=N]`` with
protocol one of linear, semi_supervised, transfer_linear, transfer_finetune, knn; ``image_size``
is the pre-training's crop size (12 for ``digits_cpu.py``'s ``small_image`` recipe).
"""

import ml_collections

from byol_flax.evaluation.config import PROTOCOLS, eval_base_config
from byol_flax.configs import digits_cpu


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    protocol, *options = (arg or "linear").split(",")
    parsed = dict(option.split("=", 1) for option in options if "=" in option)
    if protocol not in PROTOCOLS or not set(parsed) <= {"data", "image_size"}:
        raise ValueError(f"config argument {arg!r}: use <protocol>[,data=DIR][,image_size=N], "
                         f"protocol one of {PROTOCOLS}")
    config = eval_base_config()
    config.protocol = protocol
    config.data.dir = parsed.get("data", "data/digits")
    config.data.image_size = int(parsed.get("image_size", digits_cpu.IMAGE_SIZE))
    config.data.num_classes = 10
    config.data.source_image_size = (8, 8)
    config.data.worker_count = 0
    config.data.read_threads = 2
    config.augment.blur_kernel_divider = digits_cpu.BLUR_KERNEL_DIVIDER
    config.feature_batch_size = 256
    config.linear.augment = "none"
    config.linear.batch_size = 256
    config.semi_supervised.label_fraction = 0.1
    config.semi_supervised.batch_size = 128
    config.semi_supervised.epochs = (30,)
    config.transfer_finetune.batch_size = 128
    config.transfer_finetune.steps = 200
    config.knn.k = (20,)
    return config
