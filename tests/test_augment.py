"""Augmentations against Appendix C and Table 6, measured over many draws."""

import io
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from byol_flax.data import augment as aug

N = 2000  # draws per rate; a rate p is checked to +-4 standard deviations
TABLE_6 = {  # parameter: (T, T')
    "flip_prob": (0.5, 0.5), "color_jitter_prob": (0.8, 0.8), "brightness": (0.4, 0.4),
    "contrast": (0.4, 0.4), "saturation": (0.2, 0.2), "hue": (0.1, 0.1),
    "grayscale_prob": (0.2, 0.2), "blur_prob": (1.0, 0.1), "solarize_prob": (0.0, 0.2),
}


def assert_rate(hits: int, n: int, p: float):
    tolerance = 4 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(hits / n - p) <= tolerance + 1e-9, (hits / n, p)


@pytest.fixture
def config():
    return aug.default_augment_config()


def test_defaults_are_table_6(config):
    for key, (t, t_prime) in TABLE_6.items():
        assert config.view1[key] == t and config.view2[key] == t_prime, key
    assert (config.crop_area_min, config.crop_area_max) == (0.08, 1.0)  # Appendix C
    assert (config.crop_aspect_min, config.crop_aspect_max) == (3 / 4, 4 / 3)
    assert (config.view1.blur_sigma_min, config.view1.blur_sigma_max) == (0.1, 2.0)
    assert aug.blur_kernel_size(224, config.blur_kernel_divider) == 23  # "23 x 23" at 224 px
    assert aug.blur_kernel_size(32, config.blur_kernel_divider) == 3


def test_random_crop_area_and_aspect_ranges(config):
    rng = np.random.default_rng(0)
    width, height = 400, 400  # square: rejections do not favour either orientation
    boxes = [aug.sample_crop_box(width, height, rng, config) for _ in range(N)]
    area = np.array([w * h / (width * height) for _, _, w, h in boxes])
    log_aspect = np.array([math.log(w / h) for _, _, w, h in boxes])
    assert all(0 <= left and 0 <= t and left + w <= width and t + h <= height
               for left, t, w, h in boxes)
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert area.min() < 0.1 and area.max() > 0.9  # the whole range is used
    assert log_aspect.min() >= math.log(3 / 4) - 0.02 and log_aspect.max() <= math.log(4 / 3) + 0.02
    # Log-uniform aspect: symmetric around 0 in log space; area roughly uniform.
    assert abs(log_aspect.mean()) < 0.02
    assert 0.45 < area.mean() < 0.6


def test_crop_falls_back_to_a_center_crop(config):
    config.crop_attempts = 0
    rng = np.random.default_rng(0)
    assert aug.sample_crop_box(240, 200, rng, config) == (0, 0, 240, 200)  # aspect in range
    # Too wide for aspect 4/3: the widest in-range center crop.
    assert aug.sample_crop_box(1000, 300, rng, config) == (300, 0, 400, 300)


def test_flip_rate_and_views_are_uint8_at_the_configured_size(config):
    config.crop_area_min = 1.0  # crop = whole image, so a flip is the only change
    config.crop_aspect_min = config.crop_aspect_max = 1.0
    pixels = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    rng = np.random.default_rng(2)
    flips = 0
    for _ in range(N):
        view = aug.train_view(image, 16, rng, config, config.view1)
        assert view.dtype == np.uint8 and view.shape == (16, 16, 3)
        flips += bool(np.array_equal(view, pixels[:, ::-1])) and not np.array_equal(view, pixels)
    assert_rate(flips, N, 0.5)


def test_decode_reduction_never_takes_a_crop_below_the_output_size():
    assert aug.decode_reduction([(0, 0, 500, 600)], 224) == 2  # 500 / 2 >= 224 > 500 / 4
    assert aug.decode_reduction([(0, 0, 500, 600), (9, 9, 223, 300)], 224) == 1
    assert aug.decode_reduction([(0, 0, 300, 280)], 32) == 8  # libjpeg goes no further
    assert aug.decode_reduction([(0, 0, 127, 4000)], 32) == 2


def test_reduced_decoding_scales_jpegs_only_and_reports_the_scale():
    pixels = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    encoded = {}
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        encoded[fmt] = buffer.getvalue()
    asked = []
    image, scale = aug.decode_image_reduced(
        encoded["JPEG"], lambda w, h: asked.append((w, h)) or 4)
    assert asked == [(400, 300)] and image.size == (100, 75) and scale == (4.0, 4.0)
    image, scale = aug.decode_image_reduced(encoded["PNG"], lambda w, h: 4)
    assert image.size == (400, 300) and scale == (1.0, 1.0)


def test_eval_view_resizes_shorter_side_then_center_crops():
    pixels = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    out = aug.eval_view(Image.fromarray(pixels), 224)
    assert out.shape == (224, 224, 3)
    resized = Image.fromarray(pixels).resize((384, 256), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(resized)[16:240, 80:304])


def random_images(n, size=8, low=0.0, high=1.0, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=low, maxval=high)


def only(config, view, **probabilities):
    """A view config with every random transform off except those given."""
    cfg = config[view]
    for key in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        cfg[key] = probabilities.get(key, 0.0)
    return cfg


def photometric(images, view, config, seed=1):
    return np.asarray(jax.jit(lambda x, k: aug.photometric_augment(x, k, view, config))(
        images, jax.random.key(seed)))


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_color_jitter_rate(config, view):
    images = random_images(N)
    p = TABLE_6["color_jitter_prob"][0 if view == "view1" else 1]
    out = photometric(images, only(config, view, color_jitter_prob=p), config)
    changed = np.abs(out - np.asarray(images)).reshape(N, -1).max(axis=1) > 1e-4
    assert_rate(int(changed.sum()), N, p)
    assert out.min() >= 0.0 and out.max() <= 1.0  # values stay in [0, 1]


def test_color_jitter_order_varies_and_is_honoured(config):
    image = random_images(1, seed=3)[0]
    ops = [jax.jit(op) for op in aug.color_jitter_ops(config.view1)]
    color_jitter = jax.jit(lambda x, k: aug._color_jitter(x, k, config.view1))
    op_keys = list(jax.random.split(jax.random.key(7), 4))
    by_order = {}
    for perm in itertools.permutations(range(4)):
        x = image
        for i in perm:
            x = ops[i](x, op_keys[i])
        by_order[perm] = np.asarray(x)
    assert len({arr.tobytes() for arr in by_order.values()}) > 12  # order matters
    seen = set()
    for seed in range(40):
        order_key = jax.random.key(seed)
        # _color_jitter splits its key into (order, brightness, contrast, saturation, hue).
        k_order, *keys = jax.random.split(order_key, 5)
        perm = tuple(int(i) for i in jax.random.permutation(k_order, 4))
        expected = image
        for i in perm:
            expected = ops[i](expected, keys[i])
        got = color_jitter(image, order_key)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        seen.add(perm)
    assert len(seen) > 10


def test_color_jitter_magnitudes(config):
    """Brightness shifts by U[-0.4, 0.4]; contrast scales by U[0.6, 1.4] around the mean."""
    ops = aug.color_jitter_ops(config.view1)
    flat = jnp.full((4, 4, 3), 0.5)
    deltas = np.array([float(ops[0](flat, k)[0, 0, 0]) - 0.5
                       for k in jax.random.split(jax.random.key(0), 500)])
    assert -0.4 <= deltas.min() < -0.35 and 0.35 < deltas.max() <= 0.4
    ramp = jnp.linspace(0.3, 0.7, 48).reshape(4, 4, 3)
    factors = np.array([float((ops[1](ramp, k) - ramp.mean((0, 1)))[0, 0, 0]
                              / (ramp - ramp.mean((0, 1)))[0, 0, 0])
                        for k in jax.random.split(jax.random.key(1), 500)])
    assert 0.6 <= factors.min() < 0.65 and 1.35 < factors.max() <= 1.4


def test_grayscale_rate_and_luma_formula(config):
    images = random_images(N, seed=4)
    out = photometric(images, only(config, "view1", grayscale_prob=0.2), config)
    gray = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
    assert_rate(int(gray.sum()), N, 0.2)
    x = np.asarray(images)[gray]
    luma = 0.2989 * x[..., 0] + 0.5870 * x[..., 1] + 0.1140 * x[..., 2]  # Appendix C
    np.testing.assert_allclose(out[gray][..., 0], luma, atol=1e-5)


def sigma_from_impulse(out_center_row, radius):
    """Invert the centre weight of a normalised Gaussian kernel to its sigma."""
    grid = np.linspace(0.05, 3.0, 3000)
    x = np.arange(-radius, radius + 1)
    centre = np.array([1 / np.exp(-x**2 / (2 * s**2)).sum() for s in grid])
    return np.interp(-out_center_row, -centre, grid)


def blurred_impulses(config, view, size=64):
    """Blur responses of centred impulses (kernel 7 at 64 px: sigma is recoverable)."""
    impulse = np.zeros((N, size, size, 3), np.float32)
    impulse[:, size // 2, size // 2, :] = 1.0
    out = photometric(jnp.asarray(impulse), config[view], config)
    return out[:, size // 2, size // 2, 0]


@pytest.mark.parametrize("view,p", [("view1", 1.0), ("view2", 0.1)])
def test_blur_rate(config, view, p):
    only(config, view, blur_prob=p)
    config[view].blur_sigma_min = 0.5  # every blur visibly lowers the centre
    centre = blurred_impulses(config, view)
    assert_rate(int((centre < 0.99).sum()), N, p)


def test_blur_sigma_range(config):
    only(config, "view1", blur_prob=1.0)
    centre = blurred_impulses(config, "view1")
    radius = aug.blur_kernel_size(64, config.blur_kernel_divider) // 2
    # Separable blur: centre = w0^2, w0 the centre weight of the 1-D kernel.
    sigma = sigma_from_impulse(np.sqrt(centre), radius)
    assert sigma.max() <= 2.0 + 1e-2 and sigma.max() > 1.95
    # U[0.1, 2.0]; below ~0.3 the kernel is a numerical delta, so check the resolvable part.
    resolvable = sigma[sigma > 0.5]
    assert abs(len(resolvable) / N - 1.5 / 1.9) < 0.04
    assert abs(resolvable.mean() - 1.25) < 0.05


@pytest.mark.parametrize("view,p", [("view1", 0.0), ("view2", 0.2)])
def test_solarize_rate_and_formula(config, view, p):
    images = random_images(N, low=0.55, high=1.0, seed=5)  # every pixel is >= 0.5
    out = photometric(images, only(config, view, solarize_prob=p), config)
    solarized = np.all(np.abs(out - (1.0 - np.asarray(images))) < 1e-6, axis=(1, 2, 3))
    untouched = np.all(np.abs(out - np.asarray(images)) < 1e-6, axis=(1, 2, 3))
    assert np.all(solarized ^ untouched)
    assert_rate(int(solarized.sum()), N, p)
    dark = random_images(8, low=0.0, high=0.49, seed=6)  # x < 0.5 is left as is
    np.testing.assert_allclose(photometric(dark, only(config, view, solarize_prob=1.0), config),
                               dark, atol=1e-6)


def test_device_augment_normalises_with_imagenet_statistics(config):
    for view in ("view1", "view2"):
        only(config, view)
        config[view].flip_prob = 0.0
    batch = {"view1": np.full((2, 8, 8, 3), 255, np.uint8),
             "view2": np.zeros((2, 8, 8, 3), np.uint8)}
    out = aug.make_device_augment(config)(jax.random.key(0), batch)
    np.testing.assert_allclose(out["view1"][0, 0, 0], (1 - np.array(aug.IMAGENET_MEAN))
                               / np.array(aug.IMAGENET_STD), rtol=1e-5)
    np.testing.assert_allclose(out["view2"][0, 0, 0], -np.array(aug.IMAGENET_MEAN)
                               / np.array(aug.IMAGENET_STD), rtol=1e-5)
