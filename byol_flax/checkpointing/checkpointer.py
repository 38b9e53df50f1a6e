"""The :class:`Checkpointer`: saves and restores whole BYOL runs and owns the save policy.

Its :meth:`Checkpointer.maybe_save` (after MaxText's ``maybe_save_checkpoint``) decides the
cadence, preemption notices (SIGTERM on one host, Orbax's sync point across hosts) and the
decision to stop, so the training loop only asks it once per step.
"""

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from byol_flax.checkpointing import lease
from byol_flax.checkpointing.config_changes import run_record
from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.checkpointing.verified import (
    DAMAGED_SUFFIX,
    INTEGRITY_ITEM,
    RUN_ITEM,
    CheckpointWriteError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    layout_differences,
    metadata_tree,
    short_error,
    state_checksums,
    verify,
)
from byol_flax.config import Role, flatten_dotted, keys_with, unflatten_dotted


def _write_reason(error: BaseException) -> str:
    """The operating system's reason inside a write error (TensorStore wraps it in a long
    message naming internal files), else the shortened message."""
    text = " ".join(str(error).split())
    match = re.search(r"([A-Z][^:\"]*?) \[os_error_code='?(\d+)", text)
    if match:
        return f"{match.group(1)} (errno {match.group(2)})"
    if isinstance(error, OSError) and error.errno:
        return f"{os.strerror(error.errno)} (errno {error.errno})"
    return short_error(error)


def _agree(value: int) -> int:
    """Process 0's ``value`` on every process (multi-host decisions are taken once)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _all_processes(ok: bool) -> bool:
    """True on every process if ``ok`` is true on all of them."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@dataclasses.dataclass
class Restored:
    """A restored step: the state, the loop's counters and the run record saved with it (step,
    counters and run are None, {} and None when there was no checkpoint to restore)."""

    step: int | None
    state: nnx.State
    counters: dict[str, int]
    run: dict[str, Any] | None


class Checkpointer:
    """Saves and restores BYOL runs in ``directory`` (local or ``gs://``).

    ``run`` is what every save records about the run
    (:func:`byol_flax.checkpointing.config_changes.run_record`; by default ``config`` with no
    data identity, for tools and tests that checkpoint without a dataset). ``total_steps`` (the
    run's last step, always saved) and ``termination`` (the SIGTERM flag of a single-host run) are
    what :meth:`maybe_save` decides with, besides ``config.checkpoint.every_steps``.
    """

    def __init__(self, directory: epath.PathLike, config: ml_collections.ConfigDict,
                 run: dict[str, Any] | None = None, *, total_steps: int | None = None,
                 termination: TerminationGuard | None = None):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.max_to_keep,  # the newest is always among those kept
            keep_period=config.checkpoint.keep_period or None,
            enable_async_checkpointing=config.checkpoint.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        # The trained keys of config.model: a checkpoint restores under any value of the others
        # (how the network is computed or initialised), so they are not compared.
        model = unflatten_dotted(keys_with(json.loads(config.model.to_json()), "model",
                                           roles=(Role.TRAINED,)))
        self._model_config = {"model": model, "target": {"kind": config.target.kind}}
        self._run = run or run_record(config.to_json_best_effort(), data_identity="")
        self._every_steps = config.checkpoint.every_steps
        self._total_steps = total_steps
        self._termination = termination
        self._pending: int | None = None  # the step of the save in flight
        self.last_written: int | None = None  # the newest step known to be committed
        self.manager = ocp.CheckpointManager(
            epath.Path(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "model_config": ocp.JsonCheckpointHandler(),
                           RUN_ITEM: ocp.JsonCheckpointHandler(),
                           INTEGRITY_ITEM: ocp.JsonCheckpointHandler()})

    @property
    def directory(self) -> epath.Path:
        return epath.Path(self.manager.directory)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    @property
    def last_saved(self) -> int | None:
        """The newest step this run saved (committed or in flight) or restored; None before
        any: what a run stopped now would resume from, once its save commits."""
        return self._pending if self._pending is not None else self.last_written

    def _write_failed(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        last = f"step {self.last_written}" if self.last_written is not None else "none yet"
        return CheckpointWriteError(
            f"cannot write checkpoint step {step} to {self.directory}: {_write_reason(error)}; "
            f"the last intact checkpoint is {last} (resume from it once the cause is fixed)")

    def save(self, step: int, state: nnx.State, *, force: bool = False,
             counters: dict[str, int] | None = None) -> None:
        """Starts an asynchronous save of ``state`` and ``counters`` (the loop's running totals:
        data position, skipped records) at ``step``.

        A failure of this save or of the one before it (asynchronous saves report on the next
        call) raises :class:`CheckpointWriteError` naming the path and the last intact step.
        """
        pure = nnx.to_pure_dict(state)
        integrity = {"checksums": state_checksums(pure), "counters": dict(counters or {})}
        items = {"state": ocp.args.StandardSave(pure),
                 "model_config": ocp.args.JsonSave(self._model_config),
                 INTEGRITY_ITEM: ocp.args.JsonSave(integrity),
                 RUN_ITEM: ocp.args.JsonSave(self._run)}
        self._finish_pending()
        lease.fence()  # a run whose workdir was taken over writes no checkpoint
        try:
            self.manager.save(step, force=force, args=ocp.args.Composite(**items))
        except Exception as error:
            raise self._write_failed(step, error) from error
        self._pending = step

    def maybe_save(self, step: int, state: nnx.State, counters: dict[str, int], *,
                   check: Callable[[], None] | None = None) -> bool:
        """The loop's one checkpoint call per step; True means stop now.

        Saves ``step`` every ``config.checkpoint.every_steps``, at ``total_steps`` and on a
        preemption notice (SIGTERM on one host; Orbax's sync point under ``jax.distributed``,
        which every host reaches at the same step). ``check`` runs before a save and raises to
        refuse it (the loop's non-finite check: a bad state is never saved). After a preemption
        save it waits for the commit and returns True: the run exits cleanly and the same
        command resumes it.
        """
        # Asked on every step: under jax.distributed it is a collective all hosts must reach.
        preempted = ((self._termination is not None and self._termination.requested)
                     or self.manager.reached_preemption(step))
        if not (preempted or step % self._every_steps == 0 or step == self._total_steps):
            return False
        if check is not None:
            check()
        self.save(step, state, force=True, counters=counters)
        if not preempted:
            return False
        self.wait_until_finished()
        logging.warning("preempted: checkpoint of step %d committed; exiting. Re-run the same "
                        "command to resume.", step)
        return True

    def check_for_errors(self) -> None:
        """Raises :class:`CheckpointWriteError` as soon as the asynchronous save in flight has
        failed (the loop asks every step, so a full disk stops the run at once)."""
        if self._pending is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as error:
            failed, self._pending = self._pending, None
            raise self._write_failed(failed, error) from error

    def _finish_pending(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            failed, self._pending = self._pending, None
            raise self._write_failed(failed, error) from error
        if self._pending is not None:
            self.last_written, self._pending = self._pending, None

    def check_compatible(self, step: int, abstract: dict[str, Any] | None = None) -> None:
        """Raises :class:`IncompatibleCheckpointError` if ``step`` was written by another model
        config or holds another state layout than ``abstract`` (what this config builds)."""
        where = f"checkpoint step {step} in {self.directory}"
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                model_config=ocp.args.JsonRestore()))["model_config"]
            layout = (self.manager.item_metadata(step)["state"]
                      if abstract is not None else None)
        except Exception as error:  # an empty or half-deleted step directory
            raise DamagedCheckpointError(f"{where} cannot be read: {short_error(error)}") from error
        ours, theirs = flatten_dotted(self._model_config), flatten_dotted(saved)
        differences = [f"{key}: checkpoint {theirs.get(key)!r}, config {ours.get(key)!r}"
                       for key in sorted(ours.keys() | theirs.keys())
                       if ours.get(key) != theirs.get(key)]
        what = "a different model config"
        if not differences and layout is not None:
            differences = layout_differences(metadata_tree(layout), abstract)
            what = "a different state layout"
        if differences:
            shown = differences[:8] + ([f"... {len(differences) - 8} more"]
                                       if len(differences) > 8 else [])
            raise IncompatibleCheckpointError(
                f"{where} is intact but was written with {what}: {'; '.join(shown)}. Resume "
                "with the config it was trained with (saved in the checkpoint and the workdir's "
                "config.json), or use a new --workdir; the checkpoints were left as they are.")

    def restore(self, step: int, state: nnx.State, sharding: NamedSharding) -> Restored:
        """Restores ``step`` into the structure of ``state`` (placed with ``sharding``, which may
        come from a mesh of another size).

        Raises :class:`DamagedCheckpointError` naming the step when its files cannot be read or
        its arrays differ from the checksums written with them, and
        :class:`IncompatibleCheckpointError` when it verifies but does not fit the config.
        """
        logging.info("restoring checkpoint step %d from %s", step, self.directory)
        pure = nnx.to_pure_dict(state)
        self.check_compatible(step, pure)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                pure)
        where = f"checkpoint step {step} in {self.directory}"
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), **{
                    INTEGRITY_ITEM: ocp.args.JsonRestore(), RUN_ITEM: ocp.args.JsonRestore()}))
            integrity, run = restored[INTEGRITY_ITEM], restored[RUN_ITEM]
            checksums, counters = integrity["checksums"], dict(integrity["counters"])
        except Exception as error:  # Orbax/TensorStore raise many types for unreadable files
            raise DamagedCheckpointError(f"{where} cannot be read: {short_error(error)}") from error
        verify(restored["state"], checksums, where)
        nnx.replace_by_pure_dict(state, restored["state"])
        logging.info("restored %s", where)
        return Restored(step, state, counters, run)

    def restore_latest(self, state: nnx.State, sharding: NamedSharding) -> Restored:
        """Restores the newest valid step (``Restored.step`` is None if there is none).

        A damaged step is logged, renamed to ``<step>.damaged-<time>`` (kept for inspection; the
        run will write that step again) and the previous one tried. Under multi-host, a step is
        valid only if every process read it exactly, and process 0's list of steps is the one
        all processes walk, so every host restores the same step. If steps exist but none is
        valid the run stops: starting from scratch would silently discard the job's progress.
        An incompatible step stops the run at once (older steps are the same run).
        """
        damaged = []
        self.manager.reload()  # the steps on disk now, not those cached at construction
        steps = sorted(self.manager.all_steps(), reverse=True)
        count = _agree(len(steps))
        for index in range(count):
            step = _agree(steps[index] if index < len(steps) else -1)
            try:
                restored, error = self.restore(step, state, sharding), None
            except DamagedCheckpointError as caught:
                restored, error = None, caught
            if _all_processes(error is None):
                for bad in damaged:  # only once a valid step is found: nothing moves on a bad day
                    self._move_aside(bad)
                if damaged:
                    logging.warning("resumed from step %d; damaged steps %s were moved aside to "
                                    "<step>%s-<time>", step, damaged, DAMAGED_SUFFIX)
                self.last_written = step
                return restored
            logging.error("%s; trying the previous checkpoint", error or
                          f"checkpoint step {step} could not be read on another process")
            damaged.append(step)
        if damaged:
            raise DamagedCheckpointError(
                f"no restorable checkpoint in {self.directory}: steps {damaged} are damaged (left "
                "in place). Restore them from a copy, or move them away to start the run from "
                "scratch.")
        return Restored(None, state, {}, None)

    def _move_aside(self, step: int) -> None:
        """Process 0 renames the damaged step once every process has stopped reading it."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"byol_flax: move aside step {step}")
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(
                self.directory / f"{step}{DAMAGED_SUFFIX}-{time.time():.0f}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"byol_flax: moved aside step {step}")
        self.manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight is committed (raises :class:`CheckpointWriteError`)."""
        self._finish_pending()

    def close(self) -> None:
        self.manager.close()


