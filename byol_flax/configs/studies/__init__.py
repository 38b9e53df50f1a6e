"""One module per ablation table of the paper (Appendix G, J), each registering a function that
returns its :class:`~byol_flax.studies.study.Study` (rows of overrides and the paper's values)
in ``STUDIES`` under the module's name. Run with ``python -m byol_flax.studies --study=<name>`` (e.g. ``table21``)."""
