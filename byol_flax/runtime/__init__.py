"""byol_flax/runtime."""
