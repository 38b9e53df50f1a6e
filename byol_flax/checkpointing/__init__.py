"""Orbax checkpoints of the whole run: training state, counters, config and checksums.

One checkpoint = one step directory holding
  * ``state``: every array of the :class:`TrainState` (online, target, optimizer state, BatchNorm
    statistics, step, RNG) as a pure nested dict;
  * ``integrity``: a checksum per array and the loop's counters, among them ``examples_consumed``
    (the position in the global data stream: the data pipeline restarts there, whatever the
    number of workers or processes);
  * ``model_config``: ``config.model`` and ``config.target.kind`` (whether the state holds a
    target network) as JSON, checked on restore so that a checkpoint of another architecture is
    refused as *incompatible*, naming what differs;
  * ``config``: the run's full config and data identity
    (:mod:`byol_flax.checkpointing.config_changes` decides what a resume may change).
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so
a killed save never looks like a checkpoint, and stale temporary directories are removed.

The :class:`Checkpointer` (:mod:`~byol_flax.checkpointing.checkpointer`) also owns the policy
(:meth:`Checkpointer.maybe_save`, after MaxText's ``maybe_save_checkpoint``): the cadence,
preemption notices (SIGTERM on one host, Orbax's sync point across hosts) and the decision to stop,
so the training loop only asks it once per step.

*Damaged* means the files of a step cannot be read back exactly (the run falls back to the
previous step); *incompatible* means they verify but describe another run (nothing is moved).
Every reader (training, evaluation, export) goes through this package; the readers of one step
and the checksums are :mod:`~byol_flax.checkpointing.verified`.
"""

from byol_flax.checkpointing.checkpointer import Checkpointer, Restored
from byol_flax.checkpointing.verified import (
    DAMAGED_SUFFIX,
    INTEGRITY_ITEM,
    RUN_ITEM,
    CheckpointWriteError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    committed_steps,
    layout_differences,
    read_pytree,
    read_verified,
    state_checksums,
    stored_layout,
    verify,
)
from byol_flax.config import flatten_dotted

__all__ = [
    "DAMAGED_SUFFIX", "INTEGRITY_ITEM", "RUN_ITEM", "CheckpointWriteError", "Checkpointer",
    "DamagedCheckpointError", "IncompatibleCheckpointError", "Restored", "committed_steps",
    "flatten_dotted", "layout_differences", "read_pytree", "read_verified", "state_checksums",
    "stored_layout", "verify",
]
