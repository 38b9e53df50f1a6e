"""Evaluation of BYOL representations (online monitors and the paper's protocols)."""

from byol_flax.evaluation import knn  # noqa: F401 - registers "knn"
from byol_flax.evaluation import online_classifier  # noqa: F401 - registers "online_classifier"
from byol_flax.evaluation.base import EVALUATORS, Evaluator, build_evaluators, monitor_data

__all__ = ["EVALUATORS", "Evaluator", "build_evaluators", "monitor_data"]
