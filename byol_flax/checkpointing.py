"""Orbax checkpoints of the whole run: training state, data iterator and model config.

One checkpoint = one step directory holding
  * ``state``: every array of the :class:`TrainState` (online, target, optimizer state, BatchNorm
    statistics, step, RNG) as a pure nested dict;
  * ``data``: the Grain iterator state, so the next batch after a restore is the one an
    uninterrupted run would have drawn;
  * ``model_config``: ``config.model`` and ``config.target.kind`` (whether the state holds a
    target network) as JSON, checked on restore so that a checkpoint of another architecture fails
    with a message saying what differs.
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so
a killed save never looks like a checkpoint, and stale temporary directories are removed.
"""

import json
import logging
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the work directory was written by a different model config."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


class Checkpointer:
    """Saves and restores BYOL runs in ``directory`` (local or ``gs://``)."""

    def __init__(self, directory: epath.PathLike, config: ml_collections.ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.max_to_keep,  # the newest is always among those kept
            enable_async_checkpointing=config.checkpoint.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._model_config = {"model": json.loads(config.model.to_json()),
                              "target": {"kind": config.target.kind}}
        self.manager = ocp.CheckpointManager(
            epath.Path(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "model_config": ocp.JsonCheckpointHandler()})

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, data_iterator: Any, *, force: bool = False) -> None:
        """Starts an asynchronous save of ``state`` and the iterator position at ``step``."""
        self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            model_config=ocp.args.JsonSave(self._model_config)))

    def check_compatible(self, step: int) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(
            model_config=ocp.args.JsonRestore()))["model_config"]
        ours, theirs = _flatten(self._model_config), _flatten(saved)
        differences = [f"{key}: checkpoint {theirs.get(key)!r}, config {ours.get(key)!r}"
                       for key in sorted(ours.keys() | theirs.keys())
                       if ours.get(key) != theirs.get(key)]
        if differences:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.manager.directory} was written with a different "
                f"model config: {'; '.join(differences)}. Use a new --workdir or the matching "
                "config.")

    def restore(self, step: int, state: nnx.State, data_iterator: Any,
                sharding: NamedSharding) -> nnx.State:
        """Restores ``step`` into the structure of ``state`` (placed with ``sharding``, which may
        come from a mesh of another size) and moves ``data_iterator`` to the saved position."""
        self.check_compatible(step)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                nnx.to_pure_dict(state))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        nnx.replace_by_pure_dict(state, restored["state"])
        logging.info("restored checkpoint step %d from %s", step, self.manager.directory)
        return state

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any of them got a preemption notice (multi-host)."""
        return self.manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
