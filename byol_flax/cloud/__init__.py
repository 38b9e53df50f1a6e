"""byol_flax/cloud."""
