"""Taking a trained encoder out: the export format and loader (``encoder``), the model card
(``model_card``) and the export command (``python -m byol_flax.export``)."""
