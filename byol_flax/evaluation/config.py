"""The evaluation config schema: every protocol's keys with the paper's values as defaults.

Appendix D.1 (linear evaluation and semi-supervised fine-tuning on ImageNet, Table 7's variant),
Appendix E.2 (transfer via linear classification with L-BFGS) and E.3 (transfer via fine-tuning),
plus the weighted kNN monitor. Experiment modules (``byol_flax/configs/eval_*.py``) start from
:func:`eval_base_config`; the dict is locked, so a typo'd key is an error.
"""

import copy

import ml_collections

from byol_flax.config import ConfigError, base_config, value_at
from byol_flax.data.augment import default_augment_config
from byol_flax.evaluation.evaluators import EVALUATORS

# The paper's protocols (each has a section below); any registered evaluator is a valid
# ``config.protocol`` (byol_flax.evaluation.evaluators.EVALUATORS).
PROTOCOLS = ("linear", "semi_supervised", "transfer_linear", "transfer_finetune", "knn")
LINEAR_AUGMENTATIONS = ("none", "spatial", "pretrain")
FEATURE_NORMS = ("none", "batchnorm")
METRICS = ("top1", "mean_per_class")
SCHEDULES = ("cosine", "constant")


def eval_base_config() -> ml_collections.ConfigDict:
    """All evaluation keys with the paper's values (Appendix D.1, E.2, E.3)."""
    config = ml_collections.ConfigDict()
    config.protocol = "linear"  # a registered evaluator: one of PROTOCOLS, knn, online_classifier
    config.name = ""  # label of the result (e.g. "byol", "random_init"); default: the protocol
    config.seed = 0  # classifier init / data order; also the random-init baseline's seed

    # Same keys as pre-training's data section, plus the three splits of the protocol: fit on
    # train_split, choose hyper-parameters on selection_split (never on test), report test_split.
    config.data = ml_collections.ConfigDict(base_config().data.to_dict())
    config.data.selection_split = "holdout"  # 10009 ImageNet train images (Appendix D.1, E.1)
    config.data.test_split = "test"  # the public ILSVRC2012 validation set for ImageNet
    config.data.max_train_examples = 0  # 0: all; >0 caps train_split (quick runs)
    config.data.max_eval_examples = 0  # 0: all; >0 caps selection_split and test_split scored
    # Pre-training augmentations for linear.augment="pretrain" (Table 7 variant): T of Table 6.
    config.augment = default_augment_config()
    config.feature_batch_size = 1024  # forward passes for features and accuracy (global batch)
    # Protocols that train (linear heads, fine-tuning) checkpoint their unit every this many
    # steps under <workdir>/checkpoints, at its end and on SIGTERM; a re-run of the command
    # resumes there (0: only at the end and on SIGTERM). Runtime role
    # (byol_flax.evaluation.resumable.EVAL_KEY_ROLES): stored results stay valid when it changes.
    config.checkpoint_every_steps = 1000
    # Frozen features of each split kept under <workdir>/features as memory maps, keyed by the
    # encoder's fingerprint, split and view: a re-run (a resumed command, another protocol
    # pointed at the same workdir) reads them instead of running the encoder again; False keeps
    # them in memory only. Runtime role, like checkpoint_every_steps.
    config.features_cache = True
    # The fine-tuning protocols (semi_supervised, transfer_finetune) train every parameter of the
    # encoder, a ViT's patch projection included when pre-training kept it frozen, as MoCo v3
    # fine-tunes; False keeps it frozen (the sin-cos position embedding is always fixed).
    config.finetune_patch_projection = True

    # Appendix D.1, linear evaluation: frozen encoder (weights and BatchNorm statistics),
    # cross-entropy, SGD + Nesterov momentum 0.9, 80 epochs, batch 1024, no weight decay, LR swept.
    config.linear = ml_collections.ConfigDict({
        "learning_rates": (0.4, 0.3, 0.2, 0.1, 0.05),
        "epochs": 80.0,
        "batch_size": 1024,
        "momentum": 0.9,
        "nesterov": True,
        # "spatial": random resized crop + flip (the protocol of the main paper); "pretrain":
        # Table 7's variant (pre-training augmentations T); "none": eval views, with features
        # computed once and the classifier trained on them (fast on small data).
        "augment": "spatial",
        # Table 7 variant: tclip(x) = alpha tanh(x / alpha) and beta * mean(tclip(x)^2).
        "tclip": False,
        "tclip_alpha": 20.0,
        "tclip_beta": 1e-2,
        "schedule": "cosine",  # the paper does not state one; cosine decay to 0 by default
        # "none": the frozen features as they are (Appendix D.1, the default). "batchnorm": each
        # feature standardised with the mean and variance of the training split's features,
        # a BatchNorm without affine parameters before the linear layer (the probe MAE and later
        # ViT work use: a ViT's class token carries a large component shared by every image,
        # which SGD at the paper's LRs cannot see past). Applied identically to every encoder
        # the protocol scores (BYOL, random init); reported beside the paper's, not instead.
        "feature_norm": "none",
    })

    # Appendix D.1, semi-supervised: whole network fine-tuned on a labelled subset of train,
    # SGD + Nesterov 0.9, batch 1024, no weight decay, LR x epochs swept.
    config.semi_supervised = ml_collections.ConfigDict({
        "label_fraction": 0.01,  # balanced subset: the same count per class (Figure 4)
        "split_file": "",  # or a file listing record ids, one per line (the SimCLR 1%/10% splits)
        "subset_seed": 0,
        "learning_rates": (0.01, 0.02, 0.05, 0.1, 0.005),
        "epochs": (30, 50),
        "batch_size": 1024,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "batchnorm_decay": 0.9,  # paper silent for D.1: pre-training's decay
    })

    # Appendix E.2: features without augmentation (shorter side resized to image_size, centre
    # crop), l2-regularised multinomial logistic regression by L-BFGS, 45 log-spaced l2 values in
    # [1e-6, 1e5] chosen on the selection split, refit on train + selection, test metric.
    config.transfer_linear = ml_collections.ConfigDict({
        "l2_min": 1e-6,
        "l2_max": 1e5,
        "l2_count": 45,
        "max_iterations": 1000,
        "tolerance": 1e-6,  # stop when the gradient norm falls below this
        "metric": "top1",  # or "mean_per_class" (Aircraft, Pets, Caltech-101, Flowers)
        "resize_ratio": 1.0,
        "refit_on_train_and_selection": True,
    })

    # Appendix E.3: fine-tuning, SGD + Nesterov 0.9, 20000 steps at batch 256; 7 log-spaced LRs in
    # [1e-4, 0.1] x (7 log-spaced weight decays in [1e-6, 1e-3] and none), each weight decay
    # divided by the LR; BatchNorm decay max(1 - 10 / s, 0.9), s = steps per epoch.
    config.transfer_finetune = ml_collections.ConfigDict({
        "learning_rate_min": 1e-4,
        "learning_rate_max": 0.1,
        "learning_rate_count": 7,
        "weight_decay_min": 1e-6,
        "weight_decay_max": 1e-3,
        "weight_decay_count": 7,
        "include_no_weight_decay": True,
        "steps": 20000,
        "batch_size": 256,
        "momentum": 0.9,
        "nesterov": True,
        "schedule": "cosine",
        "metric": "top1",
        "refit_on_train_and_selection": True,
    })

    # Weighted kNN (Wu et al., 2018): the online monitor's code, run offline.
    config.knn = ml_collections.ConfigDict({"k": (20, 200), "temperature": 0.07})
    config.lock()
    return config


def validate_eval_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Rejects values that would fail late or silently, naming the key."""
    checks = [
        (config.protocol in EVALUATORS, "protocol",
         f"must be a registered evaluator, one of {list(EVALUATORS)}"),
        (bool(config.data.dir), "data.dir",
         "is empty: point it at a byol_flax.data.convert output directory"),
        (config.data.selection_split != config.data.test_split, "data.selection_split",
         "must differ from data.test_split: hyper-parameters are never chosen on test"),
        (config.data.train_split not in (config.data.test_split, config.data.selection_split),
         "data.train_split", "must differ from data.test_split and data.selection_split"),
        (config.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0"),
        (config.linear.epochs > 0, "linear.epochs", "must be positive"),
        (all(e > 0 for e in config.semi_supervised.epochs), "semi_supervised.epochs",
         "must be positive"),
        (config.transfer_finetune.steps > 0, "transfer_finetune.steps", "must be positive"),
        (0 < config.transfer_finetune.learning_rate_min
         <= config.transfer_finetune.learning_rate_max,
         "transfer_finetune.learning_rate_min", "must be positive and <= learning_rate_max"),
        (0 < config.transfer_finetune.weight_decay_min
         <= config.transfer_finetune.weight_decay_max,
         "transfer_finetune.weight_decay_min", "must be positive and <= weight_decay_max"),
        (config.transfer_linear.l2_count >= 1, "transfer_linear.l2_count", "must be >= 1"),
        (len(config.knn.k) > 0 and all(k > 0 for k in config.knn.k), "knn.k",
         "must be a non-empty list of positive values"),
        (config.feature_batch_size > 0 and config.feature_batch_size % num_devices == 0,
         "feature_batch_size", f"must be a positive multiple of the {num_devices} devices"),
        (config.linear.augment in LINEAR_AUGMENTATIONS, "linear.augment",
         f"must be one of {LINEAR_AUGMENTATIONS}"),
        (config.linear.feature_norm in FEATURE_NORMS, "linear.feature_norm",
         f"must be one of {FEATURE_NORMS}"),
        (len(config.linear.learning_rates) > 0
         and all(lr > 0 for lr in config.linear.learning_rates), "linear.learning_rates",
         "must be a non-empty list of positive values"),
        (len(config.semi_supervised.learning_rates) > 0
         and all(lr > 0 for lr in config.semi_supervised.learning_rates),
         "semi_supervised.learning_rates", "must be a non-empty list of positive values"),
        (0 < config.semi_supervised.label_fraction <= 1, "semi_supervised.label_fraction",
         "must be in (0, 1]"),
        (config.transfer_linear.metric in METRICS, "transfer_linear.metric",
         f"must be one of {METRICS}"),
        (config.transfer_finetune.metric in METRICS, "transfer_finetune.metric",
         f"must be one of {METRICS}"),
        (0 < config.transfer_linear.l2_min < config.transfer_linear.l2_max,
         "transfer_linear.l2_min", "must be positive and below transfer_linear.l2_max"),
    ]
    for section in ("linear", "semi_supervised", "transfer_finetune"):
        checks.append((config[section].schedule in SCHEDULES, f"{section}.schedule",
                       f"must be one of {SCHEDULES}"))
        checks.append((config[section].batch_size > 0
                       and config[section].batch_size % num_devices == 0,
                       f"{section}.batch_size",
                       f"must be a positive multiple of the {num_devices} devices"))
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"config.{key}={value_at(config, key)!r} {problem}")


def monitor_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.data`` as the monitors that read ``config.monitor.data_dir`` see it: the same
    reading options, that directory when set, and none of the checks that describe the
    training data (number of classes, source image size)."""
    data = copy.deepcopy(config.data)
    if config.monitor.data_dir:
        data.dir = config.monitor.data_dir
        data.num_classes = 0
        data.source_image_size = ()
    return data


def monitor_eval_config(config: ml_collections.ConfigDict, protocol: str, *, own_data: bool
                        ) -> ml_collections.ConfigDict:
    """The evaluation config of a training monitor: pre-training's ``config.monitor`` in the
    evaluation schema (memory / fit on ``monitor.train_split``, scored on ``monitor.eval_split``;
    ``own_data``: read ``monitor.data_dir`` when set). Not validated as a protocol config is:
    a monitor has no separate test split."""
    evaluation = eval_base_config()
    monitor = config.monitor
    evaluation.protocol = protocol
    evaluation.seed = config.seed
    data = monitor_data(config) if own_data else copy.deepcopy(config.data)
    for key, value in data.items():
        evaluation.data[key] = value
    evaluation.data.train_split = monitor.train_split
    evaluation.data.selection_split = evaluation.data.test_split = monitor.eval_split
    evaluation.data.max_train_examples = monitor.max_train_examples
    evaluation.data.max_eval_examples = monitor.max_eval_examples
    evaluation.feature_batch_size = monitor.batch_size
    evaluation.knn.k = tuple(monitor.knn_k)
    evaluation.knn.temperature = monitor.knn_temperature
    evaluation.augment = copy.deepcopy(config.augment)
    return evaluation
