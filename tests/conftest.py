"""Test set-up: 8 host CPU devices (for the sharding tests) and a tiny BYOL config.

XLA_FLAGS must be set before JAX initialises its backend, which is why it happens here, at
collection time, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from byol_flax.config import base_config  # noqa: E402

TINY_IMAGE_SIZE = 16


def tiny_config(batch_size: int = 16):
    """The paper's config with a tiny encoder and heads: same code paths, seconds to compile."""
    config = base_config()
    config.model.encoder.name = "resnet_tiny"
    config.model.encoder.stem = "small"
    config.model.projector.hidden_size = 64
    config.model.projector.output_size = 32
    config.model.predictor.hidden_size = 64
    config.training.batch_size = batch_size
    return config


@pytest.fixture
def config():
    return tiny_config()


def make_views(batch_size: int, seed: int = 0, size: int = TINY_IMAGE_SIZE) -> dict:
    """Two random 'views' of a batch; distinct but correlated, like two augmentations."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    noise = lambda: 0.3 * rng.normal(size=base.shape).astype(np.float32)
    return {"view1": base + noise(), "view2": base + noise()}
