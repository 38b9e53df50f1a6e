"""The one I/O layer: every file the project reads or writes goes through it.

- :mod:`byol_flax.storage.files`: regular files only (reads bounded in size, FIFOs and devices
  refused before opening), atomic writes that never follow a link, appends that refuse one.
- :mod:`byol_flax.storage.json_files`: strict, depth-bounded JSON checked against a schema per
  kind of file (:mod:`byol_flax.storage.schemas`); standard JSON written.
- :mod:`byol_flax.storage.images`: the one image decoder, explicit formats only.
- :mod:`byol_flax.storage.append_log`: files written line by line (logs, metrics, TensorBoard
  events): appended to locally, written as numbered segments on ``gs://``, read back as one.
- :mod:`byol_flax.storage.tensorboard`: TensorBoard events without TensorFlow.
- :mod:`byol_flax.storage.staging`: a verified local copy of named files (a ``gs://`` dataset
  staged on the VM's disk).
- :mod:`byol_flax.storage.gcs`: ``gs://`` through epath/gcsfs, TensorStore and
  google-cloud-storage, all pointed at ``STORAGE_EMULATOR_HOST`` when it is set.

``tests/test_house.py`` fails when code outside this package opens, reads or writes a file by
itself (an allow-list there names the few exceptions and why).
"""

from byol_flax.storage import gcs as _gcs

_gcs.configure()
