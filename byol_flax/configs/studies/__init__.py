"""One module per ablation table of the paper (Appendix G, J): ``STUDY`` = rows of overrides and
the paper's values. Run with ``python -m byol_flax.studies --study=<name>`` (e.g. ``table21``)."""
