"""Every shipped protocol, registered, and the one way to build an evaluator from a config.

Importing a protocol module registers its evaluator in :data:`EVALUATORS`; this module imports
them all, so code that looks a name up (config validation, the monitor, the CLI) imports the
registry from here, never from :mod:`byol_flax.evaluation.base` where it is only declared.
"""

import ml_collections
from jax.sharding import Mesh

import byol_flax.evaluation.knn
import byol_flax.evaluation.linear
import byol_flax.evaluation.online_classifier
import byol_flax.evaluation.semi_supervised
import byol_flax.evaluation.transfer_finetune
import byol_flax.evaluation.transfer_linear  # noqa: F401
from byol_flax.evaluation.base import EVALUATORS, Evaluator, SweepStore

__all__ = ["EVALUATORS", "build_evaluator"]


def build_evaluator(config: ml_collections.ConfigDict, mesh: Mesh, *,
                    store: SweepStore | None = None) -> Evaluator:
    """The evaluator of ``config.protocol`` (an evaluation config), keeping finished sweep
    points in ``store``; ``run(subject)`` evaluates an encoder."""
    return EVALUATORS.get(config.protocol)(config, mesh, store=store)
