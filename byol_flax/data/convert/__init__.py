"""Command-line converters from image sources to the ArrayRecord format of byol_flax.data.records.

Converters (each ``python -m byol_flax.data.convert.<name> --help``):

- ``byol_flax.data.convert.image_folder``: image trees on disk: the ImageNet layout
  (``train/<synset>/``, ``val/`` with class folders or a label file), generic
  one-folder-per-class trees and unlabeled trees. Image files are stored byte for byte.
- ``byol_flax.data.convert.tfds_to_arrayrecord``: a TFDS dataset already prepared on disk (needs
  the optional ``tfds`` extra; never downloads).
- ``byol_flax.data.convert.digits``: the 8x8 digits shipped with scikit-learn (no download), as
  PNGs: the data of the CPU demo.

What they share: ``image_io`` (the example to write, finding image files once, a full decode,
bad images left out), ``order`` (one deterministic example order, held-out splits carved off
``train``), ``writer`` (a parallel, resumable shard writer that ends with ``manifest.json``) and
``cli`` (their common flags and the tail of every converter's main).
"""
