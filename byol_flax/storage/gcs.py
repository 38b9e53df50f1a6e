"""``gs://`` through the real clients, and one variable that points them all at a test server.

Every ``gs://`` access goes through one of three clients: ``etils.epath`` on its fsspec backend
(gcsfs) for files, TensorStore (inside Orbax) for checkpoint arrays, and google-cloud-storage for
the workdir lease's conditional writes. :func:`configure` runs when :mod:`byol_flax.storage` is
imported, before any of them is used:

- epath is kept off TensorFlow's GCS filesystem (``EPATH_USE_TF=false``): that filesystem
  hard-codes Google's endpoint, so nothing written through it can be tested, and TensorFlow is
  not part of the default install.
- With ``STORAGE_EMULATOR_HOST`` set (the Google convention; google-cloud-storage and gcsfs
  read it themselves), the settings each other client needs for the same server are derived
  from it: TensorStore's endpoint and a fixed test token, gcsfs without credentials and without
  its experimental zonal-bucket probe (a gRPC call that waits 60 s on a server without gRPC).
  A user sets one variable; a value already in the environment wins.
"""

import os

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def emulator_url() -> str | None:
    """``STORAGE_EMULATOR_HOST`` as a URL (``http://`` added to a bare host:port), or None."""
    host = os.environ.get(EMULATOR_VARIABLE, "")
    if host in ("", "default"):
        return None
    return host if "://" in host else f"http://{host}"


def derived_settings(url: str | None) -> dict[str, str]:
    """The environment every client needs: epath's backend always, the rest for a test server
    at ``url``."""
    settings = {"EPATH_USE_TF": "false"}
    if url is not None:
        settings |= {
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-server",  # TensorStore: no credential lookup
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no metadata-server probe
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # read when gcsfs is imported
        }
    return settings


def configure() -> None:
    """Sets :func:`derived_settings` in the environment (subprocesses inherit them)."""
    for name, value in derived_settings(emulator_url()).items():
        os.environ.setdefault(name, value)
