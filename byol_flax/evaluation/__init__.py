"""Evaluation of BYOL representations: one evaluator interface (``base``) for the training
monitors and the evaluation CLI, one module per protocol (collapse monitoring is
:mod:`byol_flax.collapse`)."""

# Importing a protocol module registers its evaluator.
from byol_flax.evaluation import (knn, linear, online_classifier, semi_supervised,  # noqa: F401
                                  transfer_finetune, transfer_linear)
from byol_flax.evaluation.base import (EVALUATORS, Context, Evaluator, SweepStore,
                                       build_evaluators, monitor_data, protocol, run_protocol)

__all__ = ["EVALUATORS", "Context", "Evaluator", "SweepStore", "build_evaluators",
           "monitor_data", "protocol", "run_protocol"]
