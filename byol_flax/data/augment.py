"""The image augmentations of Appendix C / Table 6, split the way the official code runs them.

Host, per example (NumPy/Pillow, inside the Grain pipeline): decode, random resized crop with a
bicubic resize, horizontal flip. Accelerator, per example inside the jitted step (dm-pix, vmapped
with one key per example): colour jitter in a random order, grayscale, Gaussian blur,
solarisation, then ImageNet mean/std normalisation. Values stay in [0, 1] until normalisation.

Every probability and magnitude comes from ``config.augment`` (defaults: Table 6), so the
ablations of Table 17 are config changes.
"""

import math
from collections.abc import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from byol_flax.storage.images import open_image

# Appendix C: "we normalize color channels by subtracting the average color and dividing by the
# standard deviation, computed on ImageNet".
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Appendix C: training crops are 224 px; evaluation resizes the shorter side to 256 and
# center-crops 224.
PAPER_CROP_SIZE = 224
EVAL_RESIZE_RATIO = 256 / PAPER_CROP_SIZE


def default_augment_config() -> ml_collections.ConfigDict:
    """Table 6 (T = view1, T' = view2) and the crop ranges of Appendix C."""
    view = dict(flip_prob=0.5, color_jitter_prob=0.8, brightness=0.4, contrast=0.4,
                saturation=0.2, hue=0.1, grayscale_prob=0.2, blur_prob=1.0,
                blur_sigma_min=0.1, blur_sigma_max=2.0, solarize_prob=0.0)
    return ml_collections.ConfigDict({
        "crop_area_min": 0.08,
        "crop_area_max": 1.0,
        "crop_aspect_min": 3 / 4,
        "crop_aspect_max": 4 / 3,
        "crop_attempts": 10,
        # Decode a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) when both views'
        # crops still cover at least the output size: a faster decode for sources much larger
        # than the crops (a phone photo at 224 px), pixels close to but not equal to a full
        # decode. Off: the official pipeline decodes every crop at full resolution.
        "crop_reduced_decode": False,
        # Kernel side = image_size / divider, made odd: 23 px at 224 px (Appendix C).
        "blur_kernel_divider": 10.0,
        "solarize_threshold": 0.5,
        "view1": dict(view),
        "view2": dict(view, blur_prob=0.1, solarize_prob=0.2),
    })


def scale_blur_to_crop_size(config: ml_collections.ConfigDict, image_size: int) -> None:
    """Scales both views' blur sigma range from Table 6's pixels of a 224-px crop to
    ``image_size`` (same blur relative to the image; for small-image recipes)."""
    factor = image_size / PAPER_CROP_SIZE
    for view in (config.view1, config.view2):
        view.blur_sigma_min *= factor
        view.blur_sigma_max *= factor


def blur_kernel_size(image_size: int, divider: float) -> int:
    """Odd kernel side: 2 * int(size / divider / 2) + 1, i.e. 23 at 224 px and 3 at 32 px."""
    return 2 * int(image_size / divider / 2) + 1


# ----------------------------------------------------------------------------------------------
# Host side.


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB Pillow image (grayscale and palette images are converted)."""
    return decode_image_reduced(data, lambda width, height: 1)[0]


def sample_crop_box(width: int, height: int, rng: np.random.Generator,
                    config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(left, top, w, h) with area ~ U[0.08, 1] of the image and log-uniform aspect in [3/4, 4/3].

    After ``crop_attempts`` failures (a sample that does not fit), falls back to the largest
    center crop whose aspect ratio is within range, as the reference implementations do.
    """
    area = width * height
    log_ratio = (math.log(config.crop_aspect_min), math.log(config.crop_aspect_max))
    for _ in range(config.crop_attempts):
        target_area = area * rng.uniform(config.crop_area_min, config.crop_area_max)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * ratio)))
        h = int(round(math.sqrt(target_area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < config.crop_aspect_min:
        w, h = width, int(round(width / config.crop_aspect_min))
    elif in_ratio > config.crop_aspect_max:
        w, h = int(round(height * config.crop_aspect_max)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


CropBox = tuple[int, int, int, int]  # (left, top, width, height) in source pixels


def sample_view(width: int, height: int, rng: np.random.Generator,
                config: ml_collections.ConfigDict, view: ml_collections.ConfigDict
                ) -> tuple[CropBox, bool]:
    """A view's random draws, in the order ``train_view`` makes them: crop box, then flip."""
    box = sample_crop_box(width, height, rng, config)
    return box, bool(rng.uniform() < view.flip_prob)


def render_view(image: Image.Image, box: CropBox, flip: bool, size: int,
                scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Crops ``box`` (source pixels; ``image`` may be decoded smaller by ``scale`` = source /
    decoded size per axis), resizes it bicubically to size x size, flips; uint8."""
    left, top, w, h = box
    sx, sy = scale
    out = image.resize((size, size), Image.Resampling.BICUBIC,
                       box=(left / sx, top / sy, (left + w) / sx, (top + h) / sy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def train_view(image: Image.Image, size: int, rng: np.random.Generator,
               config: ml_collections.ConfigDict, view: ml_collections.ConfigDict) -> np.ndarray:
    """One host-side view: random resized crop + optional flip, uint8 (size, size, 3)."""
    return render_view(image, *sample_view(image.width, image.height, rng, config, view), size)


DECODE_REDUCTIONS = (1, 2, 4, 8)  # the scales libjpeg decodes at directly


def decode_reduction(boxes: list[CropBox], size: int) -> int:
    """The largest of :data:`DECODE_REDUCTIONS` after which every crop box still has at least
    ``size`` pixels on its shorter side, so no crop is upsampled that a full decode would
    have downsampled (1 when a crop is already smaller than ``size``)."""
    shortest = min(min(w, h) for _, _, w, h in boxes)
    return max((r for r in DECODE_REDUCTIONS if shortest >= r * size), default=1)


def decode_image_reduced(data: bytes, reduction: Callable[[int, int], int]
                         ) -> tuple[Image.Image, tuple[float, float]]:
    """Encoded bytes -> (RGB image, (source / decoded width, source / decoded height)).

    ``reduction(width, height)`` is asked with the source size, read from the header, before
    anything is decoded; a JPEG is then decoded at 1/reduction of its size by libjpeg's DCT
    scaling (Pillow's draft mode), costing a fraction of a full decode. Other formats decode
    in full.
    """
    image = open_image(data)
    width, height = image.size
    factor = reduction(width, height)
    if factor > 1 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    image.load()
    return image.convert("RGB"), (width / image.width, height / image.height)


def eval_view(image: Image.Image, size: int, resize_ratio: float = EVAL_RESIZE_RATIO
              ) -> np.ndarray:
    """Resize the shorter side to size x ``resize_ratio`` (bicubic; 256/224 in Appendix C, 1 for
    the transfer features of Appendix E.2), then center-crop size x size."""
    resize = int(round(size * resize_ratio))
    scale = resize / min(image.width, image.height)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Accelerator side.


def color_jitter_ops(view: ml_collections.ConfigDict) -> list[Callable[[jax.Array, jax.Array],
                                                                        jax.Array]]:
    """The four jitter operations (brightness, contrast, saturation, hue), each clipped to
    [0, 1]."""
    ops = [
        lambda x, k: pix.random_brightness(k, x, view.brightness),
        lambda x, k: pix.random_contrast(k, x, 1 - view.contrast, 1 + view.contrast),
        lambda x, k: pix.random_saturation(k, x, 1 - view.saturation, 1 + view.saturation),
        lambda x, k: pix.random_hue(k, x, view.hue),
    ]
    return [lambda x, k, op=op: jnp.clip(op(x, k), 0.0, 1.0) for op in ops]


def _color_jitter(image: jax.Array, key: jax.Array, view: ml_collections.ConfigDict) -> jax.Array:
    """Brightness, contrast, saturation and hue shifts in a random order per image."""
    order_key, *keys = jax.random.split(key, 5)
    branches = [lambda x, op=op, k=k: op(x, k) for op, k in zip(color_jitter_ops(view), keys)]
    order = jax.random.permutation(order_key, len(branches))
    for position in range(len(branches)):
        image = jax.lax.switch(order[position], branches, image)
    return image


def _photometric(image: jax.Array, key: jax.Array, view: ml_collections.ConfigDict, *,
                 blur_kernel: int, solarize_threshold: float) -> jax.Array:
    """Table 6's per-pixel augmentations for one image in [0, 1] (H, W, 3)."""
    k_jitter, k_jitter_apply, k_gray, k_blur, k_sigma, k_solarize = jax.random.split(key, 6)
    apply = lambda k, p: jax.random.uniform(k) < p  # p = 0 never, p = 1 always
    image = jnp.where(apply(k_jitter_apply, view.color_jitter_prob),
                      _color_jitter(image, k_jitter, view), image)
    image = jnp.where(apply(k_gray, view.grayscale_prob),
                      pix.rgb_to_grayscale(image, keep_dims=True), image)
    if view.blur_prob > 0:
        sigma = jax.random.uniform(k_sigma, minval=view.blur_sigma_min, maxval=view.blur_sigma_max)
        image = jnp.where(apply(k_blur, view.blur_prob),
                          pix.gaussian_blur(image, sigma, blur_kernel), image)
    image = jnp.where(apply(k_solarize, view.solarize_prob),
                      pix.solarize(image, solarize_threshold), image)
    return jnp.clip(image, 0.0, 1.0)


def normalize(images: jax.Array) -> jax.Array:
    """[0, 1] RGB -> ImageNet-standardised floats."""
    return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def to_unit_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images


def photometric_augment(images: jax.Array, key: jax.Array, view: ml_collections.ConfigDict,
                        config: ml_collections.ConfigDict) -> jax.Array:
    """A batch (B, H, W, 3), uint8 or [0, 1] floats -> augmented [0, 1] floats, one key each."""
    images = to_unit_float(images)
    kernel = blur_kernel_size(images.shape[1], config.blur_kernel_divider)
    keys = jax.random.split(key, images.shape[0])
    fn = lambda image, k: _photometric(image, k, view, blur_kernel=kernel,
                                       solarize_threshold=config.solarize_threshold)
    return jax.vmap(fn)(images, keys)


def make_device_augment(config: ml_collections.ConfigDict
                        ) -> Callable[[jax.Array, dict[str, jax.Array]], dict[str, jax.Array]]:
    """The function the train step applies to ``{"view1", "view2"}`` host crops: T and T'."""

    def augment(key: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        key1, key2 = jax.random.split(key)
        return batch | {
            "view1": normalize(photometric_augment(batch["view1"], key1, config.view1, config)),
            "view2": normalize(photometric_augment(batch["view2"], key2, config.view2, config)),
        }

    return augment
