"""python -m data_prep.digits --out data/digits --holdout-count 150 && python -m byol_flax.main --config=experiments/digits_cpu.py --workdir=workdirs/digits

CPU-sized BYOL on the 1797 real 8x8 digits that scikit-learn ships (no download): a small
ResNet with the 32-px stem on 12-px crops, the paper's loss, optimizer, schedules and
augmentations (Table 6), scaled-down heads. Minutes on two CPU cores.

The argument is ``DATA_DIR`` (default ``data/digits``) or ``data=DATA_DIR,augment=RECIPE``:

* ``augment=paper`` (the default): Table 6 and Appendix C as they are.
* ``augment=small_image``: the documented variant for 8x8 digits upsampled to 12 px. Random crops
  keep at least 25% of the image instead of 8% (an 8% crop of an 8x8 digit is about 2x2 source
  pixels, mostly blank), and no horizontal flips (a mirrored 2, 3, 4, 5, 7 or 9 is not that
  digit). Everything else is Table 6.
"""

import ml_collections

from byol_flax.config import base_config

AUGMENTATION_RECIPES = ("paper", "small_image")
DEFAULT_RECIPE = "small_image"
# Why a recipe scores below the default at this scale (the demo report prints it when it does).
RECIPE_NOTES = {
    "paper": "Table 6's crops keep as little as 8% of an image, about 2x2 pixels of an 8x8 digit, "
             "and its flips mirror 2, 3, 4, 5, 7 and 9 into shapes of no class, so the two views "
             "often share no evidence of the digit to agree on.",
}
# 12 px: the 8-px digits upsampled enough for random crops to vary; 16 px gave a few points more
# accuracy at 1.8x the step time, too slow for the demo's 15 minutes on two cores.
IMAGE_SIZE = 12
# Blur kernel side = size / divider, made odd: 12 px / 4 -> 3 px (23 px at 224 in Appendix C).
BLUR_KERNEL_DIVIDER = 4.0


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"DIR"`` or ``"data=DIR,augment=RECIPE"`` -> {"data": ..., "augment": ...}."""
    options = {"data": "data/digits", "augment": "paper"}
    if arg and "=" not in arg:
        return options | {"data": arg}
    parsed = dict(part.split("=", 1) for part in (arg or "").split(",") if part)
    if not set(parsed) <= set(options) or parsed.get("augment", "paper") not in \
            AUGMENTATION_RECIPES:
        raise ValueError(f"config argument {arg!r}: use DATA_DIR or data=DIR,augment=RECIPE with "
                         f"RECIPE one of {AUGMENTATION_RECIPES}")
    return options | parsed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_arg(arg)
    config = base_config()
    config.seed = 0
    config.model.encoder.name = "resnet_tiny"
    config.model.encoder.stem = "small"
    config.model.projector.hidden_size = 256
    config.model.projector.output_size = 64
    config.model.predictor.hidden_size = 256
    config.training.batch_size = 128
    config.training.epochs = 40.0
    config.training.warmup_epochs = 2.0
    config.optimizer.base_learning_rate = 1.0
    config.target.base_ema = 0.99
    config.data.dir = options["data"]
    config.data.image_size = IMAGE_SIZE
    config.data.num_classes = 10
    config.data.source_image_size = (8, 8)
    config.data.worker_count = 0
    config.data.read_threads = 2
    config.checkpoint.every_steps = 100
    config.logging.every_steps = 10
    config.monitor.every_steps = 100
    config.monitor.batch_size = 256
    config.monitor.knn_k = (20,)
    config.augment.blur_kernel_divider = BLUR_KERNEL_DIVIDER
    if options["augment"] == "small_image":
        config.augment.crop_area_min = 0.25
        config.augment.view1.flip_prob = 0.0
        config.augment.view2.flip_prob = 0.0
    return config
