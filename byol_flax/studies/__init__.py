"""Studies: rows of config overrides scored by evaluations (``study``), the one runner that prints
or runs them (``runner``, ``python -m byol_flax.studies``) and its ``summary``; the demo
(``demo``, README command 1) is a study on that runner plus its ``report``."""
