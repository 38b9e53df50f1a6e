"""The one protocol every evaluator follows, and the registry that builds them from config.

An evaluator is built once from (config, mesh, graphdef) and ``run(state)`` returns named scalars;
the training loop calls the evaluators listed in ``config.monitor.evaluators`` every
``config.monitor.every_steps`` steps and writes what they return.
"""

from collections.abc import Callable
from typing import Protocol

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from byol_flax.registry import Registry


class Evaluator(Protocol):
    # Evaluators that read labels set ``needs_labels = True``: the training loop switches them
    # off before compiling when the data has none (byol_flax.train.plan_label_users).
    def run(self, state: nnx.State) -> dict[str, float]: ...


EvaluatorFactory = Callable[[ml_collections.ConfigDict, Mesh, nnx.GraphDef], Evaluator]
EVALUATORS: Registry[EvaluatorFactory] = Registry("evaluator")


def build_evaluators(config: ml_collections.ConfigDict, mesh: Mesh,
                     graphdef: nnx.GraphDef) -> list[Evaluator]:
    if not config.monitor.every_steps:
        return []
    return [EVALUATORS.get(name)(config, mesh, graphdef) for name in config.monitor.evaluators]
