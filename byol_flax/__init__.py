"""byol_flax: BYOL (Grill et al., NeurIPS 2020) on Flax NNX, optax, Grain, Orbax and CLU."""

__version__ = "0.1.0"
