"""Test set-up: 8 host CPU devices (for the sharding tests) and a tiny BYOL config.

XLA_FLAGS must be set before JAX initialises its backend, which is why it happens here, at
collection time, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture
def config():
    return tiny_config()
