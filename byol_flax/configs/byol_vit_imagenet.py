"""python -m byol_flax.main --config=byol_vit_imagenet:s16,slice=v4-64 --workdir=gs://BUCKET/byol_vit_s16 --config.data.dir=gs://BUCKET/imagenet_arrayrecord

BYOL with a Vision Transformer encoder on ImageNet, as MoCo v3 ("An Empirical Study of Training
Self-Supervised Vision Transformers", Chen, Xie and He, ICCV 2021) trains it for its Table 4
(BYOL ViT-S/16: 71.0% and ViT-B/16: 73.9% linear top-1 after 300 epochs). Each number's source:

* MoCo v3 Section 5: AdamW, batch 4096, LR = base x batch/256, 40 warm-up epochs then cosine
  decay; Table 4: 300 epochs; Section 4.1 and 6.1: the fixed random patch projection (a
  stop-gradient after the patch layer) in every framework of Table 4; the official code
  (facebookresearch/moco-v3, ``vits.py``): fixed 2-D sin-cos position embedding, the class
  token after the final LayerNorm as the representation, ViT-S with 12 heads (its Table 2;
  timm's ViT-S has 6), AdamW's PyTorch defaults (betas 0.9/0.999, eps 1e-8).
* MoCo v3 Figure 6 (BYOL, ViT-B/16, AdamW, batch 4096): base LR 1e-4, weight decay 0.03, the
  values it reports for BYOL (its 300-epoch sweep's winners are not published).
* MoCo v3's appendix: BYOL's heads "have BN in their hidden layers, but not in their output
  layers, which faithfully follow [BYOL]": the heads of Appendix J.1 (4096 / 256).
* The target decay is not given for BYOL with ViTs; tau_base 0.99 with BYOL's cosine increase
  to 1 is MoCo v3's momentum for ViTs (``--moco-m-cos``, m = 0.99), with BYOL's own schedule.
* Weight decay skips biases, LayerNorm parameters, the class token and the position embedding,
  as BYOL's LARS skips biases and BatchNorm (Appendix A) and timm's ``no_weight_decay`` does;
  MoCo v3's code decays every parameter (``optimizer.exclude_bias_and_norm=False`` does that).

The argument: ``s16`` (ViT-S/16, the default) or ``b16`` (ViT-B/16), then ``,slice=`` and
``,max_per_device=`` as in ``byol_imagenet.py``, and ``,smoke=True`` (vit_micro, seconds).
"""

import ml_collections

from byol_flax.configs import byol_imagenet, common

VIT_ENCODERS = {"s16": "vit_small", "b16": "vit_base"}
MOCO_V3_HEADS = 12  # MoCo v3 Table 2: ViT-Small and ViT-Base both have 12 heads
EPOCHS = 300.0  # MoCo v3 Table 4
WARMUP_EPOCHS = 40.0  # MoCo v3 Section 5
BASE_LEARNING_RATE = 1e-4  # MoCo v3 Figure 6, BYOL (x batch/256)
WEIGHT_DECAY = 0.03  # MoCo v3 Figure 6, BYOL
BASE_EMA = 0.99  # MoCo v3's ViT momentum (m = 0.99, cosine to 1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, positional="encoder", encoder="s16", slice="",
                               max_per_device=byol_imagenet.DEFAULT_MAX_PER_DEVICE_BATCH,
                               choices={"encoder": tuple(VIT_ENCODERS)})
    config = byol_imagenet.imagenet_config(arg, options, batch_size=4096, epochs=EPOCHS)
    encoder = config.model.encoder
    encoder.name = VIT_ENCODERS[options.encoder]
    encoder.num_heads = MOCO_V3_HEADS
    encoder.pooling = "token"
    encoder.position_embedding = "sincos"
    encoder.freeze_patch_projection = True
    config.training.warmup_epochs = WARMUP_EPOCHS
    config.optimizer.kind = "adamw"
    config.optimizer.base_learning_rate = BASE_LEARNING_RATE
    config.optimizer.weight_decay = WEIGHT_DECAY
    config.target.base_ema = BASE_EMA
    return common.finish(config, options)
