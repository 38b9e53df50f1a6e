"""Test set-up: 8 host CPU devices (for the sharding tests) and a tiny BYOL config.

XLA_FLAGS must be set before JAX initialises its backend, which is why it happens here, at
collection time, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite runs on the CPU; with the tpu extra installed (libtpu, for the pre-flight's
# compiler) JAX would otherwise try to start a TPU runtime in every process and print its failure.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's gs:// clients only ever talk to tests/gcs_server.py: gcsfs reads this when it is
# first imported (its zonal-bucket probe would wait 60 s on a server without gRPC), so it is set
# here, before any test imports it (byol_flax.storage.gcs derives it in a command's process).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One persistent JAX compilation cache for every process of the suite (pytest-xdist workers and
# the commands tests start inherit it through the environment): a program one test compiled is
# read by the next that builds it, and a re-run of the suite compiles little. Measured on
# tests/test_train_step.py, 2 cores: 73 s with an empty cache, 22 s with a warm one. Entries are
# keyed by the program, the JAX/XLA versions and the XLA flags, so a stale one is never read.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from byol_flax.runtime.xla import configure_xla_flags

configure_xla_flags()  # the entry points' XLA:CPU flags, so tests run what users run

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain's worker processes read absl flags, which main() parses via absl.app; tests have no app.
flags.FLAGS.mark_as_parsed()

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture
def config():
    return tiny_config()



@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The bundled digits as ArrayRecord shards (100 held out), converted once per session; a
    module's own ``data_dir`` fixture takes precedence."""
    from byol_flax.data.convert import digits

    out = tmp_path_factory.mktemp("digits")
    assert digits.main(["--out", str(out), "--holdout-count", "100", "--no-progress"]) == 0
    return str(out)
