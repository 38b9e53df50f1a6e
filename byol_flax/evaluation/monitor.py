"""The training monitor: registered evaluators run on the live training state during
pre-training.

Every ``config.monitor.every_steps`` steps and at the last step (after that step's save), the
:class:`Monitor` runs the evaluators ``config.monitor.evaluators`` names, each on the state's
online encoder (and online classifier) as its subject, and reports the ``test`` metrics of each
as the scalars ``<name>/<metric>``. A failing evaluator does not end a long run unless
``config.monitor.errors_are_fatal``; a pending SIGTERM skips the evaluators still to run.
The evaluators of one step share the encoder's features (:func:`sharing_features`): one encoder
pass per split and step, however many of them read it.
"""

import json
import logging
from collections.abc import Sequence
from typing import Any

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.evaluation.base import Evaluator, ProtocolEvaluator, reads_monitor_data
from byol_flax.evaluation.config import monitor_eval_config
from byol_flax.evaluation.evaluators import EVALUATORS
from byol_flax.evaluation.features import FeatureStore, sharing_features
from byol_flax.weights.encoder import PretrainedEncoder


class StateEvaluator:
    """A registered evaluator whose subject is the live training state: the online encoder (and
    the online classifier) of ``state``; the metrics it reports on its test split are named
    ``<name>/<metric>``."""

    def __init__(self, name: str, evaluator: Evaluator, graphdef: nnx.GraphDef,
                 model_config: dict[str, Any]):
        self.name = name
        self._evaluator = evaluator
        self._graphdef = graphdef
        self._model_config = model_config

    def run(self, state: nnx.State) -> dict[str, float]:
        train_state = nnx.merge(self._graphdef, state)
        subject = PretrainedEncoder(
            train_state.online.encoder, self._model_config,
            {"kind": "training"},
            classifier=getattr(train_state, "classifier", None))
        return {f"{self.name}/{metric}": value
                for metric, value in self._evaluator.run(subject)["test"].items()}


def build_state_evaluators(config: ml_collections.ConfigDict, mesh: Mesh,
                           graphdef: nnx.GraphDef) -> list[StateEvaluator]:
    """The evaluators ``config.monitor.evaluators`` names (none when ``config.monitor.every_steps``
    is 0), each reading the monitor splits, opened now so a bad split fails at start-up."""
    if not config.monitor.every_steps:
        return []
    model_config = json.loads(config.model.to_json())
    evaluators = []
    for name in config.monitor.evaluators:
        factory = EVALUATORS.get(name)
        evaluation = monitor_eval_config(config, name, own_data=reads_monitor_data(factory))
        evaluator = factory(evaluation, mesh)
        if isinstance(evaluator, ProtocolEvaluator):
            evaluator.open_splits()
        evaluators.append(StateEvaluator(name, evaluator, graphdef, model_config))
    return evaluators


class Monitor:
    """Runs ``evaluators`` at the training cadence of ``config.monitor``, after the step's save
    (the loop saves first: a failing evaluator or a preemption never costs a checkpoint)."""

    def __init__(self, evaluators: Sequence[StateEvaluator], config: ml_collections.ConfigDict,
                 *, total_steps: int, termination: TerminationGuard):
        self.evaluators = list(evaluators)
        self._every_steps = config.monitor.every_steps
        self._errors_are_fatal = config.monitor.errors_are_fatal
        self._total_steps = total_steps
        self._termination = termination

    def due(self, step: int) -> bool:
        """Whether ``step`` is a monitoring step: every ``every_steps`` and the last step."""
        return bool(self.evaluators and self._every_steps
                    and (step % self._every_steps == 0 or step == self._total_steps))

    def maybe_run(self, step: int, state: nnx.State) -> dict[str, float] | None:
        """The evaluators' scalars at a monitoring step, None at any other. A failing evaluator
        is logged with its traceback and counted (``monitor_errors/<name>``), and training goes
        on unless ``config.monitor.errors_are_fatal``; a SIGTERM skips those still to run."""
        if not self.due(step):
            return None
        scalars: dict[str, float] = {}
        # Held for this step only: the next step's encoder is another.
        with sharing_features(FeatureStore()):
            for evaluator in self.evaluators:
                if self._termination.requested:
                    logging.warning("step %d: SIGTERM pending, monitors %s skipped", step,
                                    evaluator.name)
                    break
                try:
                    scalars.update(evaluator.run(state))
                except Exception:
                    if self._errors_are_fatal:
                        raise
                    logging.exception("step %d: monitor %s failed; training continues "
                                      "(config.monitor.errors_are_fatal makes this fatal)", step,
                                      evaluator.name)
                    scalars[f"monitor_errors/{evaluator.name}"] = 1.0
        return scalars
