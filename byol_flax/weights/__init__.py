"""Weights coming in: every way an encoder enters evaluation, ``model.init_from`` or an export.

- :mod:`~byol_flax.weights.encoder`: an export directory, a pre-training workdir, a random-init or
  raw-pixel baseline (``--source``), verified and built into modules (:func:`load_encoder`,
  :func:`~byol_flax.weights.encoder.load_source`);
- :mod:`~byol_flax.weights.checkpoint`: the online encoder of a pre-training checkpoint, read
  and verified the way training reads it;
- :mod:`~byol_flax.weights.official`: DeepMind's release (a dill pickle) read as data by
  :mod:`~byol_flax.weights.safe_pickle`, never run, and mapped onto this code's modules.

Writing goes the other way, in :mod:`byol_flax.export`. A timm file for ``model.init_from`` is
read by :mod:`byol_flax.init_from` with the timm layout of :mod:`byol_flax.export.timm_vit`
(one mapping, both directions).
"""

from byol_flax.weights.encoder import load_encoder

__all__ = ["load_encoder"]
