"""byol_flax/export."""
