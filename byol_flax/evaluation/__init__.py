"""Evaluation of BYOL representations: protocols (one module each) run by evaluators, from the
evaluation CLI (:mod:`byol_flax.evaluation.runner`) or as the training monitor
(:mod:`byol_flax.evaluation.monitor`); collapse monitoring is :mod:`byol_flax.collapse`.

Modules: ``base`` (the evaluator interface, :class:`Context`, sweeps, the ``@protocol``
decorator), ``evaluators`` (every shipped protocol registered; :func:`build_evaluator`),
``config`` (the evaluation config schema), ``monitor`` (evaluators at the training cadence),
``runner`` (the CLI's body), ``features`` and ``classifier`` (what protocols share), and one
module per protocol.
"""

from byol_flax.evaluation.base import Context, Evaluator, SweepStore, protocol
from byol_flax.evaluation.evaluators import EVALUATORS, build_evaluator

__all__ = ["EVALUATORS", "Context", "Evaluator", "SweepStore", "build_evaluator", "protocol"]
