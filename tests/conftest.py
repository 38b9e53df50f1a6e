"""Test set-up: 8 host CPU devices (for the sharding tests) and a tiny BYOL config.

XLA_FLAGS must be set before JAX initialises its backend, which is why it happens here, at
collection time, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from byol_flax.runtime.xla import configure_xla_flags  # noqa: E402

configure_xla_flags()  # the entry points' XLA:CPU flags, so tests run what users run

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain's worker processes read absl flags, which main() parses via absl.app; tests have no app.
flags.FLAGS.mark_as_parsed()

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture
def config():
    return tiny_config()


# The slowest files first (seconds on one core from `--durations=0`, 2026-11-30: train_driver
# 233, performance 184+, train_step 176, reliability 156, evaluation 136, install 111, own_images
# 105, studies 104, online_classifier 101, variants 88): `--dist loadfile` hands files to the
# workers in collection order, so long files start first and short ones fill in at the end
# instead of one worker finishing a long file alone.
SLOWEST_FILES_FIRST = ("test_train_driver.py", "test_performance.py", "test_train_step.py",
                       "test_reliability.py", "test_evaluation.py", "test_install.py",
                       "test_own_images.py", "test_studies.py", "test_online_classifier.py",
                       "test_variants.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable for the rest
