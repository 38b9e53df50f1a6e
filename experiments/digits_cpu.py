"""python -m data_prep.digits --out data/digits --holdout-count 150 && python -m byol_flax.main --config=experiments/digits_cpu.py --workdir=workdirs/digits

CPU-sized BYOL on the 1797 real 8x8 digits that scikit-learn ships (no download): a small
ResNet with the 32-px stem on 16-px crops, the paper's loss, optimizer, schedules and
augmentations (Table 6), scaled-down heads. Minutes on two CPU cores. The argument overrides the
data directory (default ``data/digits``).
"""

import ml_collections

from byol_flax.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
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
    config.data.dir = arg or "data/digits"
    config.data.image_size = 16
    config.data.num_classes = 10
    config.data.source_image_size = (8, 8)
    config.data.worker_count = 0
    config.data.read_threads = 2
    config.checkpoint.every_steps = 100
    config.logging.every_steps = 10
    config.monitor.every_steps = 100
    config.monitor.batch_size = 256
    config.monitor.knn_k = (20,)
    # Blur kernel side = size / divider: 16 px / 5 -> 3 px.
    config.augment.blur_kernel_divider = 5.0
    return config
