"""The one protocol every evaluator follows, and the registry that builds them from config.

An evaluator is built once from (config, mesh, graphdef) and ``run(state)`` returns named scalars;
the training loop calls the evaluators listed in ``config.monitor.evaluators`` every
``config.monitor.every_steps`` steps and writes what they return.
"""

import copy
from collections.abc import Callable
from typing import Protocol

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from byol_flax.runtime.registry import Registry


class Evaluator(Protocol):
    # Evaluators that read labels set ``needs_labels = True``: the training loop switches them
    # off before compiling when the data they read has none (byol_flax.train.plan_label_users).
    # Those that set ``reads_monitor_data = True`` read ``config.monitor.data_dir`` when it is
    # set (a labelled dataset of the user's choosing beside unlabeled training data), through
    # :func:`monitor_data`; the others read the training data.
    def run(self, state: nnx.State) -> dict[str, float]: ...


def monitor_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.data`` as the monitors that read ``config.monitor.data_dir`` see it: the same
    reading options, that directory when set, and none of the checks that describe the
    training data (number of classes, source image size)."""
    data = copy.deepcopy(config.data)
    if config.monitor.data_dir:
        data.dir = config.monitor.data_dir
        data.num_classes = 0
        data.source_image_size = ()
    return data


EvaluatorFactory = Callable[[ml_collections.ConfigDict, Mesh, nnx.GraphDef], Evaluator]
EVALUATORS: Registry[EvaluatorFactory] = Registry("evaluator")


def build_evaluators(config: ml_collections.ConfigDict, mesh: Mesh,
                     graphdef: nnx.GraphDef) -> list[Evaluator]:
    if not config.monitor.every_steps:
        return []
    return [EVALUATORS.get(name)(config, mesh, graphdef) for name in config.monitor.evaluators]
