"""Small builders shared by the tests: a tiny BYOL config and random two-view batches. (The
reliability suite's process helpers and checkpoint readers are imported from
``benchmarks.reliability_processes``.)"""

import json

import numpy as np

from byol_flax.config import base_config
from byol_flax.configs.common import SMOKE_MODEL

TINY_IMAGE_SIZE = 16


def tiny_config(batch_size: int = 16):
    """The paper's config with the smoke switch's tiny model (resnet_tiny, 32-px stem, small
    heads): same code paths, seconds to compile. The rest stays the paper's, so unit tests see
    its schedule and cadences."""
    config = base_config()
    config.update_from_flattened_dict(SMOKE_MODEL)
    config.training.batch_size = batch_size
    return config


def tiny_vit_config(batch_size: int = 16, **encoder):
    """:func:`tiny_config` with vit_micro (4-px patches of the 32-px stem: 16 tokens and a class
    token at 16 px) and ``encoder`` options (pooling, position_embedding, ...)."""
    config = tiny_config(batch_size)
    config.data.image_size = TINY_IMAGE_SIZE
    config.model.encoder.name = "vit_micro"
    config.model.encoder.update(encoder)
    return config


def make_views(batch_size: int, seed: int = 0, size: int = TINY_IMAGE_SIZE) -> dict:
    """Two random 'views' of a batch; distinct but correlated, like two augmentations."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    noise = lambda: 0.3 * rng.normal(size=base.shape).astype(np.float32)
    return {"view1": base + noise(), "view2": base + noise()}


def metrics_by_step(workdir) -> dict[int, dict[str, float]]:
    """<workdir>/metrics.jsonl by step (a step's scalars and monitor lines merged); no value of
    a step is written twice."""
    merged: dict[int, dict[str, float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        values = json.loads(line)
        row = merged.setdefault(values["step"], {})
        assert not (set(row) & set(values)) - {"step"}, values
        row.update(values)
    return merged
