"""Small builders shared by the tests: a tiny BYOL config and random two-view batches."""

import numpy as np

from byol_flax.config import base_config

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


def make_views(batch_size: int, seed: int = 0, size: int = TINY_IMAGE_SIZE) -> dict:
    """Two random 'views' of a batch; distinct but correlated, like two augmentations."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    noise = lambda: 0.3 * rng.normal(size=base.shape).astype(np.float32)
    return {"view1": base + noise(), "view2": base + noise()}
