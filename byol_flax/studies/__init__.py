"""byol_flax/studies."""
