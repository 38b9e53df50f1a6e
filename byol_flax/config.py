"""The config schema: every key with its default, set to the paper's ImageNet values.

Defaults are Section 4 / Appendix J.1 (``HPS``): 1000 epochs at batch 4096, LARS with base LR 0.2,
weight decay 1.5e-6, trust coefficient 1e-3, momentum 0.9, tau_base 0.996, 10 warm-up epochs,
BatchNorm decay 0.9 / eps 1e-5, MLP hidden size 4096, projection size 256, seed 1337.
Experiment modules in ``byol_flax/configs/`` start from :func:`base_config` and override fields; the
returned dict is locked, so a typo'd key is an error instead of a silently ignored setting.
"""

import dataclasses
import enum
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from byol_flax.data.augment import default_augment_config
from byol_flax.data.imagenet import IMAGENET_TRAIN_EXAMPLES  # noqa: F401 - re-exported for configs
from byol_flax.errors import UserError
from byol_flax.losses import NORMALIZATIONS
from byol_flax.models.conv import CONV_IMPLEMENTATIONS
from byol_flax.models.encoders import ENCODERS, WIDTH_MULTIPLIERS, is_vit
from byol_flax.models.predictors import PREDICTORS
from byol_flax.models.vit import (
    FINAL_NORMS,
    PATCH_SIZE_BY_STEM,
    POOLINGS,
    POSITION_EMBEDDINGS,
    effective_patch_size,
)
from byol_flax.optim import OPTIMIZERS


class Role(enum.StrEnum):
    """What changing a key changes: decides what a resume may change, what a checkpoint must
    match and what the model card calls the recipe."""

    TRAINED = "trained"  # what is trained: a resume that changes it is refused unless allowed
    RUNTIME = "runtime"  # how the run executes (workers, cadence, logging): changes freely
    INIT = "init"  # how a new run starts: a resumed run takes its weights from its checkpoint


@dataclasses.dataclass(frozen=True)
class KeyRole:
    """A key's :class:`Role` and whether the jitted train step's program reads it (such keys form
    the step cache's key: runs that differ only in other keys reuse the compiled step)."""

    role: Role
    in_step: bool


# Dotted key or section -> its role, declared in base_config next to the defaults. A section's
# role covers every key under it that declares none of its own.
_ROLES: dict[str, KeyRole] = {}


def _declare(role: Role, *keys: str, in_step: bool = False) -> None:
    for key in keys:
        _ROLES[key] = KeyRole(role, in_step)


def base_config() -> ml_collections.ConfigDict:
    """All config keys with the paper's defaults (Appendix J.1)."""
    config = ml_collections.ConfigDict()
    config.seed = 1337
    _declare(Role.TRAINED, "seed")  # the initial state and the host's crops; not the program

    config.model = ml_collections.ConfigDict()
    # zero_init_residual: the last BatchNorm scale of each residual block starts at 0 (Goyal et
    # al.) instead of 1. The paper used 1 (official README, note on batch normalisation: the
    # zero-initialisation in its code was not used for the paper and hurts the widest nets).
    # Initialisation only: not part of a checkpoint's compatibility check.
    config.model.encoder = ml_collections.ConfigDict(
        {"name": "resnet50", "width_multiplier": 1, "stem": "imagenet",
         "zero_init_residual": False})
    _declare(Role.TRAINED, "model", in_step=True)
    _declare(Role.INIT, "model.encoder.zero_init_residual")
    # Vision Transformers only (byol_flax.models.vit; ignored by ResNets at these values).
    # patch_size: 0 = by stem (16 px for "imagenet", 4 px for "small"). pooling: "token" (the
    # class token, MoCo v3) or "mean" (of the patch tokens). position_embedding: "sincos" (fixed,
    # MoCo v3) or "learned" (timm). freeze_patch_projection: keep the random patch projection
    # fixed, MoCo v3's stability measure (byol_vit_imagenet sets it). final_norm: "layernorm"
    # (timm's, MoCo v3's) or "batchnorm" (a BatchNorm over the pooled token: the representation
    # centred per feature as a ResNet's is; the digits' ViT recipe, docs/demo_calibration.md).
    config.model.encoder.patch_size = 0
    config.model.encoder.num_heads = 0  # 0: the size's (timm's: ViT-S 6, ViT-B 12)
    config.model.encoder.pooling = "token"
    config.model.encoder.position_embedding = "sincos"
    config.model.encoder.freeze_patch_projection = False
    config.model.encoder.final_norm = "layernorm"
    config.model.projector = ml_collections.ConfigDict(
        {"hidden_size": 4096, "output_size": 256, "depth": 2})
    # kind: a name in byol_flax.models.predictors.PREDICTORS (mlp, linear, identity,
    # closed_form_linear). ridge: closed_form_linear's regulariser, relative to the mean
    # eigenvalue of Z^T Z (Appendix J.2 solves without one; it keeps a collapsed batch solvable).
    config.model.predictor = ml_collections.ConfigDict(
        {"kind": "mlp", "hidden_size": 4096, "depth": 2, "ridge": 1e-4})
    config.model.batchnorm = ml_collections.ConfigDict({"decay": 0.9, "eps": 1e-5})
    # The official implementation's online classifier: a linear layer trained with the labels on
    # the stop-gradient representation during pre-training (no gradient reaches the encoder); its
    # held-out top-1 is the training curve to watch. Switched off, with a log line, when the
    # training split has no labels.
    config.model.online_classifier = True
    # bfloat16 halves activation memory on TPU; parameters and BN statistics stay float32.
    config.model.compute_dtype = "float32"
    # How convolutions are computed (byol_flax.models.conv): "auto" (XLA's own; on the CPU also
    # patches + matmul for the small maps XLA:CPU handles slowly, materialised inputs and sliced
    # strided 1x1s), "xla" or "patches". Numerics are equal; not part of a checkpoint's
    # compatibility check.
    config.model.conv_implementation = "auto"
    _declare(Role.RUNTIME, "model.conv_implementation", in_step=True)
    # init_from: an export directory (byol_flax.export; an imported official checkpoint or an
    # export of one of our runs) whose encoder a NEW run starts from instead of random init, to
    # continue pre-training released or earlier weights on other data or with another recipe.
    # The target starts as the copy of the loaded online network, the optimizer state fresh and
    # the step at 0 (byol_flax.init_from). The export's encoder and BatchNorm settings
    # must equal model.encoder / model.batchnorm. Or a timm ViT checkpoint (a .safetensors
    # file with timm's keys, e.g. a Hugging Face model.safetensors) for a ViT encoder of the same
    # shapes (docs/vit.md). "" = random init.
    # init_from_heads: also load the projector and predictor when the export kept them (they
    # must then have this config's shapes); the online classifier always starts fresh.
    # Initialisation only: a resumed run takes its weights from its checkpoint, so neither key
    # is part of a checkpoint's compatibility check.
    config.model.init_from = ""
    config.model.init_from_heads = True
    _declare(Role.INIT, "model.init_from", "model.init_from_heads")

    config.optimizer = ml_collections.ConfigDict()
    _declare(Role.TRAINED, "optimizer", "target", "loss", "training", in_step=True)
    # "lars" (Appendix A) or "adamw" (MoCo v3's for ViTs: byol_vit_imagenet); the LR schedule,
    # weight decay, exclusions and multipliers below apply to both.
    config.optimizer.kind = "lars"
    config.optimizer.base_learning_rate = 0.2  # scaled by batch_size / 256
    config.optimizer.weight_decay = 1.5e-6
    config.optimizer.momentum = 0.9
    config.optimizer.trust_coefficient = 1e-3  # LARS eta
    # AdamW's moment decays and epsilon (PyTorch's defaults, which MoCo v3 keeps).
    config.optimizer.adam_b1 = 0.9
    config.optimizer.adam_b2 = 0.999
    config.optimizer.adam_eps = 1e-8
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
    # Table 19's target parameters: "ema" (xi, BYOL), "stop_gradient" (sg(theta): the online
    # network's own outputs, no gradient) or "online" (theta: gradient flows through the targets).
    # Only "ema" keeps a separate target network in the state.
    config.target.kind = "ema"

    # Eq. 5 (Appendix G.4): -InfoNCE^{alpha,beta}, symmetrised over the two views. beta = 0 is
    # BYOL's loss; beta = 1 without predictor and target is the SimCLR baseline of G.5 (Eq. 10
    # x 2 alpha). normalization (Appendix G.6, Table 20): "l2" (BYOL), "layernorm",
    # "batchnorm" (non-trainable, over the batch) or "none"; LN/BN are divided by sqrt(d).
    config.loss = ml_collections.ConfigDict()
    config.loss.beta = 0.0
    config.loss.temperature = 0.1  # alpha; Table 5b / G.4 use SimCLR's best, 0.1
    config.loss.normalization = "l2"
    config.loss.normalization_eps = 1e-5  # added to the LN/BN variances
    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 4096  # global, over all devices and hosts
    config.training.epochs = 1000.0
    config.training.warmup_epochs = 10.0
    # Examples per epoch when converting epochs to steps; 0 = the train split's size from the
    # manifest. ImageNet configs pin 1281167 so step counts equal the paper's (Appendix J.1) even
    # when 10009 images are held out for validation.
    config.training.num_train_examples = 0
    # Appendix G.2: average gradients over N micro-batches, one optimizer and target update per N.
    config.training.accumulation_steps = 1

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # written by byol_flax.data.convert (holds manifest.json); or gs://
    # The data a run trains on is its identity (the manifest's sha256), not where it lies.
    _declare(Role.RUNTIME, "data.dir", "data.local_cache_dir")
    # gs:// datasets are copied here at start-up (ArrayRecord reads local files).
    config.data.local_cache_dir = "/tmp/byol_flax_data"
    config.data.train_split = "train"
    config.data.image_size = 224  # crop size fed to the network (Appendix C)
    # What the encoder is built for (a ViT's position embedding): tied to data.image_size (a
    # reference: setting either sets both), recorded in config.model so exports rebuild it.
    config.model.encoder.image_size = config.data.get_ref("image_size")
    _declare(Role.TRAINED, "data.train_split", "data.image_size")
    config.data.num_classes = 0  # if set, must equal the manifest's number of label names
    config.data.source_image_size = ()  # if set, must equal the manifest's recorded (H, W)
    config.data.verify_checksums = True  # sha256 of every shard at start-up
    config.data.max_skipped_records = 0  # 0: an undecodable record is an error
    config.data.worker_count = 8  # Grain worker processes for decode + crop (0: in-process)
    config.data.read_threads = 16
    config.data.prefetch_buffer_size = 256
    _declare(Role.RUNTIME, "data.num_classes", "data.source_image_size", "data.verify_checksums",
             "data.max_skipped_records", "data.worker_count", "data.read_threads",
             "data.prefetch_buffer_size")

    config.augment = default_augment_config()
    # Table 6: every augmentation is trained. The crops and flips run on the host (Grain
    # workers); the photometric ones inside the step.
    _declare(Role.TRAINED, "augment", in_step=True)
    _declare(Role.TRAINED, *(f"augment.{key}" for key in config.augment if key.startswith("crop_")),
             "augment.view1.flip_prob", "augment.view2.flip_prob")

    config.checkpoint = ml_collections.ConfigDict()
    _declare(Role.RUNTIME, "checkpoint", "logging", "monitor")
    config.checkpoint.every_steps = 1000
    config.checkpoint.max_to_keep = 3
    # Steps that are multiples of keep_period are kept forever, besides the max_to_keep newest
    # (Orbax's keep period; 0: none), e.g. for evaluating intermediate encoders later.
    config.checkpoint.keep_period = 0
    config.checkpoint.async_save = True
    # A run holds <workdir>/lease.json (byol_flax.checkpointing.lease). A start on a workdir
    # whose holder is another host waits at most this long for the holder's heartbeat to stop,
    # then takes over: a relaunch after a preemption trains again within a minute with no manual
    # step, and a live holder (heartbeats every sixth of it, 10 s: one small write, cheap on
    # gs://) is named within one heartbeat. A dead process on the same host is noticed at once.
    config.checkpoint.lease_stale_after_seconds = 60.0

    config.logging = ml_collections.ConfigDict()
    config.logging.every_steps = 100  # scalars, finiteness check, collapse warnings
    config.logging.profile_steps = 0  # >0: jax.profiler traces that many steps once (train_logging)

    config.monitor = ml_collections.ConfigDict()
    config.monitor.every_steps = 5000  # 0 disables the online evaluation
    # Names in byol_flax.evaluation.EVALUATORS; those that need labels are dropped, with a log
    # line, when the monitor splits have none (and online_classifier when it is not trained).
    config.monitor.evaluators = ("knn", "online_classifier")
    # A labelled dataset (a byol_flax.data.convert output) the kNN monitor reads instead of the
    # training data: training on unlabeled images can still be watched on labelled ones. "": the
    # training data. The online classifier always uses the training data's labels.
    config.monitor.data_dir = ""
    config.monitor.train_split = "train"  # labelled examples forming the kNN memory
    config.monitor.eval_split = "holdout"  # queries
    config.monitor.max_train_examples = 10_000
    config.monitor.max_eval_examples = 10_000
    config.monitor.batch_size = 1024  # a multiple of the device count (512 on v3-512)
    config.monitor.knn_k = (20, 200)
    config.monitor.knn_temperature = 0.07
    # A monitor that raises is logged with its traceback and counted, and training continues;
    # True makes it end the run (after the step's checkpoint is saved).
    config.monitor.errors_are_fatal = False
    config.lock()
    return config


@functools.cache
def key_roles() -> Mapping[str, KeyRole]:
    """Every key and section of :func:`base_config` that declares a role, with it."""
    base_config()
    return dict(_ROLES)


def role_of(key: str) -> KeyRole | None:
    """The role of the dotted ``key``: its own declaration or its nearest section's; None for a
    key :func:`base_config` does not declare."""
    roles = key_roles()
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in roles:
            return roles[prefix]
    return None


def flatten_dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (empty dicts vanish); lists and arrays are leaves."""
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(flatten_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def unflatten_dotted(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dicts of {"a.b.c": leaf}: the inverse of :func:`flatten_dotted`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, name = key.split(".")
        section = tree
        for parent in parents:
            section = section.setdefault(parent, {})
        section[name] = value
    return tree


def keys_with(tree: Mapping[str, Any], prefix: str = "", *, roles: tuple[Role, ...] = (),
              in_step: bool | None = None) -> dict[str, Any]:
    """The leaves of the config ``tree`` (JSON form; ``prefix``: its dotted place in the whole
    config) whose role is one of ``roles`` (any when empty) and whose ``in_step`` matches (either
    when None), as {dotted key relative to ``tree``: value}. A key without a declared role counts
    as trained and read by the step: a new key is safe by default."""
    kept = {}
    for key, value in flatten_dotted(tree).items():
        role = role_of(f"{prefix}.{key}" if prefix else key) or KeyRole(Role.TRAINED, True)
        if (not roles or role.role in roles) and in_step in (None, role.in_step):
            kept[key] = value
    return kept


def step_program(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config values the jitted train step's program depends on (JSON form)."""
    return keys_with(json.loads(config.to_json()), in_step=True)


TARGET_KINDS = ("ema", "stop_gradient", "online")


class ConfigError(UserError, ValueError):
    """A config value is wrong or inconsistent; the message names the key."""


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Rejects inconsistent values before anything is compiled, naming the key.

    Unknown keys and wrong types are already rejected by the locked ConfigDict itself.
    """
    checks = [
        (config.training.batch_size > 0, "training.batch_size", "must be positive"),
        (config.training.batch_size % num_devices == 0, "training.batch_size",
         f"must be divisible by the {num_devices} devices of the mesh's data axis"),
        (config.training.accumulation_steps >= 1, "training.accumulation_steps", "must be >= 1"),
        ((config.training.batch_size // max(config.training.accumulation_steps, 1)) % num_devices
         == 0 and config.training.batch_size % max(config.training.accumulation_steps, 1) == 0,
         "training.accumulation_steps",
         f"must split training.batch_size into micro-batches divisible by {num_devices} devices"),
        (config.training.epochs > 0, "training.epochs", "must be positive"),
        (0 <= config.training.warmup_epochs < config.training.epochs, "training.warmup_epochs",
         "must be >= 0 and shorter than training.epochs"),
        (config.optimizer.kind in OPTIMIZERS, "optimizer.kind",
         f"must be one of {list(OPTIMIZERS)}"),
        (config.optimizer.base_learning_rate > 0, "optimizer.base_learning_rate",
         "must be positive"),
        (config.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0"),
        (0 <= config.target.base_ema <= 1, "target.base_ema", "must be in [0, 1]"),
        (config.target.schedule in ("cosine", "constant"), "target.schedule",
         "must be 'cosine' or 'constant'"),
        (config.model.encoder.name in ENCODERS, "model.encoder.name",
         f"must be one of {list(ENCODERS)}"),
        (config.model.predictor.kind in PREDICTORS, "model.predictor.kind",
         f"must be one of {list(PREDICTORS)}"),
        (config.model.predictor.depth >= 1, "model.predictor.depth",
         "must be >= 1 (the number of Linear layers, Table 14)"),
        (config.model.projector.depth >= 1, "model.projector.depth",
         "must be >= 1 (the number of Linear layers, Table 14)"),
        (config.model.predictor.ridge >= 0, "model.predictor.ridge", "must be >= 0"),
        (config.target.kind in TARGET_KINDS, "target.kind", f"must be one of {list(TARGET_KINDS)}"),
        (config.loss.normalization in NORMALIZATIONS, "loss.normalization",
         f"must be one of {list(NORMALIZATIONS)}"),
        (config.loss.temperature > 0, "loss.temperature", "must be positive (alpha of Eq. 5)"),
        (config.loss.beta >= 0, "loss.beta", "must be >= 0 (beta of Eq. 5)"),
        (config.optimizer.predictor_lr_multiplier >= 0, "optimizer.predictor_lr_multiplier",
         "must be >= 0"),
        (config.optimizer.projector_lr_multiplier >= 0, "optimizer.projector_lr_multiplier",
         "must be >= 0"),
        (config.model.encoder.width_multiplier in WIDTH_MULTIPLIERS,
         "model.encoder.width_multiplier", f"must be one of {WIDTH_MULTIPLIERS}"),
        (config.model.encoder.stem in ("imagenet", "small"), "model.encoder.stem",
         "must be 'imagenet' or 'small'"),
        *_vit_checks(config),
        (config.model.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype",
         "must be float32 or bfloat16: float16 needs loss scaling, which byol_flax does not do; "
         "use bfloat16 (A100, H100 and TPU support it)"),
        (config.model.conv_implementation in CONV_IMPLEMENTATIONS, "model.conv_implementation",
         f"must be one of {list(CONV_IMPLEMENTATIONS)}"),
        (bool(config.data.dir), "data.dir",
         "is empty: point it at a byol_flax.data.convert output directory"),
        (config.data.image_size > 0, "data.image_size", "must be positive"),
        (config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive"),
        (config.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1"),
        (config.checkpoint.keep_period >= 0, "checkpoint.keep_period", "must be >= 0"),
        (config.checkpoint.lease_stale_after_seconds > 0, "checkpoint.lease_stale_after_seconds",
         "must be positive"),
        (config.logging.every_steps > 0, "logging.every_steps", "must be positive"),
        (not config.monitor.every_steps or (config.monitor.batch_size > 0
                                            and config.monitor.batch_size % num_devices == 0),
         "monitor.batch_size", f"must be a positive multiple of the {num_devices} devices"),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"config.{key}={value_at(config, key)!r} {problem}")


def _vit_checks(config: ml_collections.ConfigDict) -> list[tuple[bool, str, str]]:
    """validate_config's checks of the Vision Transformer keys (byol_flax.models.vit)."""
    encoder = config.model.encoder
    return [
        (encoder.pooling in POOLINGS, "model.encoder.pooling", f"must be one of {list(POOLINGS)}"),
        (encoder.position_embedding in POSITION_EMBEDDINGS, "model.encoder.position_embedding",
         f"must be one of {list(POSITION_EMBEDDINGS)}"),
        (encoder.final_norm in FINAL_NORMS, "model.encoder.final_norm",
         f"must be one of {list(FINAL_NORMS)}"),
        (encoder.patch_size >= 0, "model.encoder.patch_size", "must be >= 0 (0: by stem)"),
        (encoder.num_heads >= 0, "model.encoder.num_heads", "must be >= 0 (0: the encoder's)"),
        (not is_vit(encoder.name) or encoder.stem not in PATCH_SIZE_BY_STEM
         or config.data.image_size % effective_patch_size(encoder.stem, encoder.patch_size) == 0,
         "data.image_size", "must be a multiple of the ViT's patch size (model.encoder.patch_size,"
         f" or by stem {PATCH_SIZE_BY_STEM})"),
    ]


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any, *, origin: str) -> None:
    """``config[a][b][c] = value`` for ``key = "a.b.c"``; unknown keys are an error naming
    ``origin`` (the study row) instead of a silently ignored override."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise KeyError(f"{origin}: override {key!r}: no config section {part!r}")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"{origin}: override {key!r}: no config key {leaf!r} in {list(node)}")
    node[leaf] = value


def value_at(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value of the dotted key ``dotted`` (``"model.encoder.name"``) of ``config``."""
    for part in dotted.split("."):
        config = config[part]
    return config


def training_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
    """(total steps K, warm-up steps) of a config: the one place epochs become steps."""
    examples = config.training.num_train_examples or num_train_examples
    total = steps_from_epochs(config.training.epochs, num_examples=examples,
                              batch_size=config.training.batch_size)
    warmup = steps_from_epochs(config.training.warmup_epochs, num_examples=examples,
                               batch_size=config.training.batch_size)
    if total < 1:
        raise ConfigError(f"config.training.epochs={config.training.epochs} gives no step at "
                          f"batch size {config.training.batch_size} over {examples} examples")
    return total, warmup


def steps_from_epochs(epochs: float, *, num_examples: int, batch_size: int) -> int:
    """Converts a duration in epochs to optimizer steps, as Appendix J.1 does: int(e * n / b)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(math.floor(epochs * num_examples / batch_size))


# Section 5's SimCLR baseline (Appendix G.5): no predictor, the online network as its own target
# (gradient flowing), beta = 1 in Eq. 5 (the InfoNCE loss x 2 alpha) at SimCLR's best alpha 0.1.
SIMCLR = {"model.predictor.kind": "identity", "target.kind": "online", "loss.beta": 1.0,
          "loss.temperature": 0.1}
# Appendix J.1: no moving average; the target is a hard copy of the online network every step.
NO_EMA = {"target.base_ema": 0.0, "target.schedule": "constant"}
