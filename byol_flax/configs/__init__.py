"""Experiment config modules: ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``."""
