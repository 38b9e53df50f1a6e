"""The config schema: every key with its default, set to the paper's ImageNet values.

Defaults are Section 4 / Appendix J.1 (``HPS``): 1000 epochs at batch 4096, LARS with base LR 0.2,
weight decay 1.5e-6, trust coefficient 1e-3, momentum 0.9, tau_base 0.996, 10 warm-up epochs,
BatchNorm decay 0.9 / eps 1e-5, MLP hidden size 4096, projection size 256, seed 1337.
Experiment modules in ``experiments/`` start from :func:`base_config` and override fields; the
returned dict is locked, so a typo'd key is an error instead of a silently ignored setting.
"""

import math

import ml_collections

from byol_flax.data.augment import default_augment_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # Appendix J.1: max_steps = 1000 * 1281167 / 4096


def base_config() -> ml_collections.ConfigDict:
    """All config keys with the paper's defaults (Appendix J.1)."""
    config = ml_collections.ConfigDict()
    config.seed = 1337

    config.model = ml_collections.ConfigDict()
    config.model.encoder = ml_collections.ConfigDict(
        {"name": "resnet50", "width_multiplier": 1, "stem": "imagenet"})
    config.model.projector = ml_collections.ConfigDict(
        {"hidden_size": 4096, "output_size": 256, "depth": 2})
    config.model.predictor = ml_collections.ConfigDict({"hidden_size": 4096, "depth": 2})
    config.model.batchnorm = ml_collections.ConfigDict({"decay": 0.9, "eps": 1e-5})
    # bfloat16 halves activation memory on TPU; parameters and BN statistics stay float32.
    config.model.compute_dtype = "float32"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.base_learning_rate = 0.2  # scaled by batch_size / 256
    config.optimizer.weight_decay = 1.5e-6
    config.optimizer.momentum = 0.9
    config.optimizer.trust_coefficient = 1e-3  # LARS eta
    # Appendix A: biases and BatchNorm parameters skip both LARS adaptation and weight decay.
    config.optimizer.exclude_bias_and_norm = True
    # Appendix J.1: learning-rate multipliers lambda (predictor) and mu (projector).
    config.optimizer.predictor_lr_multiplier = 1.0
    config.optimizer.projector_lr_multiplier = 1.0

    config.target = ml_collections.ConfigDict()
    config.target.base_ema = 0.996  # tau_base
    # "cosine": tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2; "constant": tau_k = tau_base
    # (Appendix J.1 uses constant tau = 0: the target is a hard copy of the online network).
    config.target.schedule = "cosine"

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 4096  # global, over all devices and hosts
    config.training.epochs = 1000.0
    config.training.warmup_epochs = 10.0
    config.training.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    # Appendix G.2: average gradients over N micro-batches, one optimizer and target update per N.
    config.training.accumulation_steps = 1

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # a directory written by data_prep/ (holds manifest.json)
    config.data.train_split = "train"
    config.data.image_size = 224  # crop size fed to the network (Appendix C)
    config.data.num_classes = 0  # if set, must equal the manifest's number of label names
    config.data.source_image_size = ()  # if set, must equal the manifest's recorded (H, W)
    config.data.verify_checksums = True  # sha256 of every shard at start-up
    config.data.max_skipped_records = 0  # 0: an undecodable record is an error
    config.data.worker_count = 8  # Grain worker processes for decode + crop (0: in-process)
    config.data.read_threads = 16
    config.data.prefetch_buffer_size = 256

    config.augment = default_augment_config()
    return config


def steps_from_epochs(epochs: float, *, num_examples: int, batch_size: int) -> int:
    """Converts a duration in epochs to optimizer steps, as Appendix J.1 does: int(e * n / b)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(math.floor(epochs * num_examples / batch_size))
