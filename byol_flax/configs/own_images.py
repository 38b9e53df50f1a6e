"""python -m byol_flax.data.convert.image_folder --layout unlabeled --src ~/my_images --out data/my_images --holdout-count 500 && python -m byol_flax.main --config=own_images:data=data/my_images --workdir=workdirs/my_images

BYOL on a folder of your own images, labelled or not, on one host. The argument is ``DATA_DIR``
(default ``data/my_images``) or
``data=DIR[,size=N][,encoder=NAME][,batch=B][,epochs=E][,monitor=DIR][,smoke=True]``: the few
choices a user makes. Everything else is the paper's (Table 6 augmentations, LARS with base LR
0.2 scaled by batch / 256, weight decay 1.5e-6, tau_base 0.996 on a cosine schedule, 10 warm-up
epochs, 4096-256 projector and predictor, seed 1337), except one host-side speed-up: JPEGs are
decoded at 1/2-1/8 of their size when both crops keep at least ``size`` px
(``augment.crop_reduced_decode``; camera photos decode 3.4x faster, the pixels differ from a full
decode by ~0.3 of 255 on average).

* ``size`` (default 96): crop side fed to the network. 96 px (STL-10's size) keeps a ResNet-18
  step affordable on one accelerator; 224 is the paper's. Below 64 px the 32-px stem (3x3
  stride 1, no max-pool) is used: the ImageNet stem would leave a 4x smaller map. Table 6's blur
  sigma is scaled from 224-px pixels to the crop size (the same blur relative to the image).
* ``encoder`` (default resnet18): any of ``byol_flax.models.resnet.ENCODERS``; resnet50 is the
  paper's.
* ``batch`` (default 256) and ``epochs`` (default 100): a folder of a few thousand images gets
  a few thousand steps, a few million images a few hundred thousand.
* ``monitor``: a labelled dataset (a byol_flax.data.convert output directory with ``train``
  and ``holdout`` splits)
  for the kNN monitor while training on unlabeled images; without it, the monitors that need
  labels are switched off at start-up with one log line (the collapse monitors always run).

These defaults are starting points that fit the hardware, not values tuned on any dataset: the
demo's sweep (``docs/demo_calibration.md``) shows how much recipe choices move results at small
scale, so tune on your data with a study (``python -m byol_flax.studies``). The run prints how
many images and steps it will train before compiling.
"""

import os

import ml_collections

from byol_flax.config import base_config
from byol_flax.configs import common
from byol_flax.data.augment import scale_blur_to_crop_size

# Below this crop side the ImageNet stem (4x downsampling) leaves too small a feature map.
SMALL_STEM_BELOW = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, positional="data", data="data/my_images", size=96,
                               encoder="resnet18", batch=256, epochs=100.0, monitor="")
    config = base_config()
    config.data.dir = options.data
    config.data.image_size = options.size
    config.model.encoder.name = options.encoder
    config.model.encoder.stem = "small" if options.size < SMALL_STEM_BELOW else "imagenet"
    config.training.batch_size = options.batch
    config.training.epochs = options.epochs
    scale_blur_to_crop_size(config.augment, options.size)
    # Own folders hold camera photos far larger than the crops: decoding them at 1/2-1/8 size
    # (DCT scaling, each crop still at least `size` px) made the host pipeline 3.4x faster on
    # 4032x3024 JPEGs at 224 px (docs/performance.md). The paper's configs decode in full.
    config.augment.crop_reduced_decode = True
    # Runtime choices (free to change on resume): decoding workers for this host, and a cadence
    # of checkpoints, logs and monitors that suits runs of thousands of steps.
    config.data.worker_count = min(8, max((os.cpu_count() or 1) - 1, 0))
    config.data.read_threads = 8
    config.checkpoint.every_steps = 500
    config.logging.every_steps = 50
    config.monitor.every_steps = 1000
    config.monitor.data_dir = options.monitor
    return common.finish(config, options)
