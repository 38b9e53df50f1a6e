"""Experiment config modules: ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``.

Commands name them with ``--config=NAME[:ARG]`` (``byol_imagenet:r50x1`` is
``byol_flax/configs/byol_imagenet.py:r50x1``); the lookup is
:mod:`byol_flax.runtime.config_names`. ``studies/`` holds the paper tables' study modules.
"""
