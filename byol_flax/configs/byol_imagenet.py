"""python -m byol_flax.main --config=byol_imagenet:r50x1,slice=v4-64 --workdir=gs://BUCKET/byol_r50x1 --config.data.dir=gs://BUCKET/imagenet_arrayrecord

BYOL on ImageNet with the hyper-parameters of Section 4 and Appendix J.1: 1000 epochs at batch
4096, LARS (eta 1e-3, momentum 0.9), base LR 0.2 x batch/256 with 10 warm-up epochs and cosine
decay, weight decay 1.5e-6, tau_base 0.996, BatchNorm decay 0.9 / eps 1e-5, seed 1337; bfloat16
compute with float32 parameters (``ACCELERATOR_COMPUTE_DTYPE``, below, says why).

The argument picks an encoder of Table 9: ``r<depth>x<width>``, e.g. ``r50x1`` (the default),
``r200x2``, ``r50x4``, optionally followed by ``,slice=<accelerator type>`` (and
``,max_per_device=<n>``, default 128): the paper's batch 4096 is then split over the slice's
devices, with gradient accumulation (Appendix G.2) when more than ``max_per_device`` examples
would land on one device (see ``byol_flax/cloud/slices.py``). ``,smoke=True``: the seconds-long
version (``byol_flax/configs/common.py``). Data: ``python -m byol_flax.data.convert.image_folder
--layout imagenet --imagenet-holdout`` writes ``train`` (1271158 images), ``holdout`` (10009,
Appendix D.1: a seeded random choice; ``byol_flax.data.convert.tfds_to_arrayrecord
--imagenet-holdout`` takes the paper's exact last 10009 of the TFDS split, Appendix E.1) and
``validation``; steps per epoch still use the full 1281167 images, as the paper's HPS do.
"""

import re

import ml_collections

from byol_flax.cloud.slices import devices_in_slice, plan_batch
from byol_flax.config import IMAGENET_TRAIN_EXAMPLES, base_config
from byol_flax.configs import common

DEFAULT_MAX_PER_DEVICE_BATCH = 128
# Precision: bfloat16 activations and matmul inputs, float32 parameters, BatchNorm statistics,
# loss, EMA and LARS (byol_flax.models casts; tests/test_performance.py checks the losses track
# float32 and the parameters stay float32). Why: these configs run on TPUs and GPUs, where
# bfloat16 halves activation memory and traffic and doubles matrix-unit throughput; the paper's
# TPU v3 runs already fed the matrix units bfloat16 (XLA's default precision for float32
# convolutions there), which is the rounding bfloat16 compute adds. The paper states no
# precision. smoke=True runs (CPU) use float32.
ACCELERATOR_COMPUTE_DTYPE = "bfloat16"

TABLE_9_ENCODERS = ("r50x1", "r101x1", "r152x1", "r200x1", "r50x2", "r101x2", "r50x3", "r152x2",
                    "r200x2", "r50x4", "r101x3", "r152x3")


def parse_encoder(arg: str) -> tuple[str, int]:
    """``"r200x2"`` -> ("resnet200", 2)."""
    match = re.fullmatch(r"r(\d+)x(\d)", arg)
    if not match:
        raise common.ConfigArgumentError(f"config argument {arg!r} is not an encoder like "
                                         f"'r50x1'; Table 9 has {TABLE_9_ENCODERS}")
    return f"resnet{match.group(1)}", int(match.group(2))


def get_config(arg: str | None = None, *, batch_size: int = 4096, epochs: float = 1000.0
               ) -> ml_collections.ConfigDict:
    """``batch_size`` and ``epochs`` are for variants (Appendix H, Section 5): the slice plan
    splits their batch and ``smoke=True`` still shrinks their schedule."""
    options = common.parse_arg(arg, positional="encoder", encoder="r50x1", slice="",
                               max_per_device=DEFAULT_MAX_PER_DEVICE_BATCH)
    config = imagenet_config(arg, options, batch_size=batch_size, epochs=epochs)
    config.model.encoder.name, config.model.encoder.width_multiplier = parse_encoder(
        options.encoder)
    return common.finish(config, options)


def imagenet_config(arg: str | None, options: ml_collections.ConfigDict, *, batch_size: int,
                    epochs: float) -> ml_collections.ConfigDict:
    """The paper's ImageNet run (Appendix J.1) at ``batch_size`` for ``epochs``, split over the
    ``options.slice`` (``slice``/``max_per_device`` of the argument ``arg``), in bfloat16; the
    encoder and smoke are the caller's."""
    config = base_config()  # the defaults are Appendix J.1
    config.training.batch_size = batch_size
    config.training.epochs = epochs
    config.training.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    config.data.num_classes = 1000
    config.model.compute_dtype = ACCELERATOR_COMPUTE_DTYPE
    if options.slice:
        try:
            plan = plan_batch(config.training.batch_size, devices_in_slice(options.slice),
                              options.max_per_device)
        except ValueError as error:  # an unknown slice, a batch it cannot split: the argument's
            raise common.ConfigArgumentError(f"config argument {arg!r}: {error}") from error
        config.training.accumulation_steps = plan.accumulation_steps
    return config
