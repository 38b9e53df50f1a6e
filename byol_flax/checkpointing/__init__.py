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

The :class:`Checkpointer` also owns the policy (:meth:`Checkpointer.maybe_save`, after MaxText's
``maybe_save_checkpoint``): the cadence, preemption notices (SIGTERM on one host, Orbax's sync
point across hosts) and the decision to stop, so the training loop only asks it once per step.

*Damaged* means the files of a step cannot be read back exactly (the run falls back to the
previous step); *incompatible* means they verify but describe another run (nothing is moved).
Every reader (training, evaluation, export) goes through this module.
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
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from byol_flax.errors import UserError
from byol_flax.checkpointing.preemption import TerminationGuard

# Keys of config.model that change how the network is computed or initialised, not what a
# checkpoint holds: it restores under any of their values, so they are left out of the saved
# model config (dotted paths within config.model).
RUNTIME_MODEL_KEYS = ("conv_implementation", "encoder.zero_init_residual", "init_from",
                      "init_from_heads")


class IncompatibleCheckpointError(UserError, ValueError):
    """The checkpoint verifies but was written by a different model config or state layout."""


class DamagedCheckpointError(UserError, IOError):
    """A checkpoint step cannot be read back exactly (missing, truncated or altered files)."""


class CheckpointWriteError(UserError, IOError):
    """A checkpoint could not be written (disk full, permissions); earlier steps are intact."""


INTEGRITY_ITEM = "integrity"
RUN_ITEM = "config"
DAMAGED_SUFFIX = ".damaged"


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per array: sum_i (2 i + 1) * bits_i mod 2^32 over the raw bits of its elements.

    The weights are odd, so flipping any single bit changes the sum; position-dependent, so
    swapped elements do too. Runs where the arrays live (no host copy of the state).
    """
    out = []
    for x in leaves:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
        weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
        out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return out


def state_checksums(pure_state: dict[str, Any]) -> dict[str, int]:
    """{flattened path: checksum} of a pure-dict state (what the ``state`` item holds)."""
    flat = flatten_dotted(pure_state)
    values = jax.device_get(_checksums([jnp.asarray(v) for v in flat.values()]))
    return {key: int(value) for key, value in zip(flat, values)}


def flatten_dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (empty dicts vanish); lists and arrays are leaves."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten_dotted(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _short(error: BaseException) -> str:
    """One line for an exception raised deep inside Orbax or TensorStore."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _write_reason(error: BaseException) -> str:
    """The operating system's reason inside a write error (TensorStore wraps it in a long
    message naming internal files), else the shortened message."""
    text = " ".join(str(error).split())
    match = re.search(r"([A-Z][^:\"]*?) \[os_error_code='?(\d+)", text)
    if match:
        return f"{match.group(1)} (errno {match.group(2)})"
    if isinstance(error, OSError) and error.errno:
        return f"{os.strerror(error.errno)} (errno {error.errno})"
    return _short(error)


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


def _layout(tree: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{flattened path: (shape, dtype)} of a pure state or of Orbax's metadata of one."""
    return {key: (tuple(value.shape), str(np.dtype(value.dtype)))
            for key, value in flatten_dotted(tree).items()}


def layout_differences(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's state layout and the one the config builds."""
    old, new = _layout(saved), _layout(expected)
    out = [f"{key}: only in the checkpoint" for key in sorted(old.keys() - new.keys())]
    out += [f"{key}: only in the config's state" for key in sorted(new.keys() - old.keys())]
    out += [f"{key}: checkpoint {old[key][0]} {old[key][1]} -> config {new[key][0]} {new[key][1]}"
            for key in sorted(old.keys() & new.keys()) if old[key] != new[key]]
    return out


@dataclasses.dataclass
class Restored:
    """A restored step: the state, the loop's counters and the run record saved with it (None
    for checkpoints written before run records)."""

    step: int | None
    state: nnx.State
    counters: dict[str, int]
    run: dict[str, Any] | None


class Checkpointer:
    """Saves and restores BYOL runs in ``directory`` (local or ``gs://``).

    ``run`` is what every save records about the run
    (:func:`byol_flax.checkpointing.config_changes.run_record`). ``total_steps`` (the run's last
    step, always saved) and ``termination`` (the SIGTERM flag of a single-host run) are what
    :meth:`maybe_save` decides with, besides ``config.checkpoint.every_steps``.
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
        model = json.loads(config.model.to_json())
        for key in RUNTIME_MODEL_KEYS:
            *parents, name = key.split(".")
            section = model
            for parent in parents:
                section = section.get(parent, {})
            section.pop(name, None)
        self._model_config = {"model": model, "target": {"kind": config.target.kind}}
        self._run = run
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
                 INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}
        if self._run is not None:
            items[RUN_ITEM] = ocp.args.JsonSave(self._run)
        self._finish_pending()
        try:
            self.manager.save(step, force=force, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - any write failure gets the one-line form
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
        except Exception as error:  # noqa: BLE001
            failed, self._pending = self._pending, None
            raise self._write_failed(failed, error) from error

    def _finish_pending(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
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
            raise DamagedCheckpointError(f"{where} cannot be read: {_short(error)}") from error
        ours, theirs = flatten_dotted(self._model_config), flatten_dotted(saved)
        differences = [f"{key}: checkpoint {theirs.get(key)!r}, config {ours.get(key)!r}"
                       for key in sorted(ours.keys() | theirs.keys())
                       if ours.get(key) != theirs.get(key)]
        what = "a different model config"
        if not differences and layout is not None:
            differences = layout_differences(_metadata_tree(layout), abstract)
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
        step_dir = self.directory / str(step)
        # Checkpoints of older versions have no integrity item (not verified) or no run record.
        has_integrity = (step_dir / INTEGRITY_ITEM).exists()
        items = {INTEGRITY_ITEM: ocp.args.JsonRestore()} if has_integrity else {}
        if (step_dir / RUN_ITEM).exists():
            items[RUN_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), **items))
        except Exception as error:  # Orbax/TensorStore raise many types for unreadable files
            raise DamagedCheckpointError(f"{where} cannot be read: {_short(error)}") from error
        integrity = (restored[INTEGRITY_ITEM] or {}) if has_integrity else {}
        if not has_integrity:
            logging.warning("%s has no checksums (written by an older version): not verified",
                            where)
        verify(restored["state"], integrity.get("checksums"), where)
        nnx.replace_by_pure_dict(state, restored["state"])
        logging.info("restored %s", where)
        return Restored(step, state, dict(integrity.get("counters", {})),
                        restored[RUN_ITEM] if RUN_ITEM in items else None)

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


def _metadata_tree(metadata: Any) -> dict[str, Any]:
    """Orbax's state metadata as a nested dict of objects with ``shape`` and ``dtype``."""
    tree = getattr(metadata, "tree", metadata)
    return tree if isinstance(tree, dict) else dict(tree)


def stored_layout(path: epath.PathLike) -> dict[str, Any]:
    """The shapes and dtypes a PyTree checkpoint at ``path`` recorded (nested dict of objects
    with ``shape`` and ``dtype``), read without loading an array: what
    :func:`layout_differences` compares."""
    return _metadata_tree(ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)))


def verify(pure_state: dict[str, Any], expected: dict[str, int] | None, where: str) -> None:
    """Raises :class:`DamagedCheckpointError` if an array of ``pure_state`` differs from its saved
    checksum. ``pure_state`` may be a part of the saved state: keys absent from it are skipped."""
    if expected is None:
        return
    actual = state_checksums(pure_state)
    missing = sorted(k for k in actual if k not in expected)
    altered = sorted(k for k in actual if k in expected and expected[k] != actual[k])
    if altered or missing:
        raise DamagedCheckpointError(
            f"{where} is damaged: {len(altered) + len(missing)} array(s) differ from the "
            f"checksums saved with them, e.g. {(altered + missing)[:3]}")


def committed_steps(directory: epath.PathLike) -> list[int]:
    """The steps of a checkpoint directory whose saves completed (Orbax's view), ascending."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def read_verified(directory: epath.PathLike, *, prefix: tuple[str, ...] = (),
                  step: int | None = None
                  ) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """Reads the arrays stored under ``prefix`` of the state of a committed step (the newest
    valid one by default), shaped as the step recorded them and verified against its checksums:
    (step, arrays, run record or None). What evaluation and export read
    (:mod:`byol_flax.checkpointing.encoder`).

    An explicitly requested ``step`` that is damaged raises :class:`DamagedCheckpointError`; the
    default falls back to the previous valid step with a warning (nothing is moved or deleted).
    """
    directory = epath.Path(directory)
    steps = committed_steps(directory)
    if step is not None and step not in steps:
        raise DamagedCheckpointError(f"step {step} is not a committed checkpoint in {directory}: "
                                     f"committed steps are {steps}")
    candidates = [step] if step is not None else list(reversed(steps))
    errors = []
    for candidate in candidates:
        try:
            arrays, run = _read_part(directory / str(candidate), prefix)
        except DamagedCheckpointError as error:
            if step is not None:
                raise
            logging.warning("%s; trying the previous checkpoint", error)
            errors.append(candidate)
            continue
        if errors:
            logging.warning("read step %d of %s: newer steps %s are damaged", candidate,
                            directory, errors)
        return candidate, arrays, run
    raise DamagedCheckpointError(f"no readable checkpoint in {directory}: "
                                 + (f"steps {errors} are damaged" if errors else "none committed"))


def read_pytree(path: epath.PathLike, target: dict[str, Any], prefix: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """The arrays shaped like ``target`` stored under ``prefix`` of the PyTree checkpoint at
    ``path``, on this process's first device, still nested under ``prefix`` (Orbax partial
    restore: everything else stays on disk). Not verified: see :func:`read_verified`."""
    item = target
    for key in reversed(prefix):
        item = {key: item}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            item)
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        epath.Path(path), args=ocp.args.PyTreeRestore(
            abstract, restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract),
            partial_restore=bool(prefix)))


def _read_part(step_dir: epath.Path, prefix: tuple[str, ...]
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    where = f"checkpoint {step_dir}"
    try:
        # The shapes and dtypes Orbax recorded with the step, under ``prefix``.
        target = stored_layout(step_dir / "state")
        for key in prefix:
            target = target[key]
        restored = read_pytree(step_dir / "state", target, prefix)
        integrity_file = step_dir / INTEGRITY_ITEM / "metadata"
        integrity = json.loads(integrity_file.read_text()) if integrity_file.exists() else None
        run_file = step_dir / RUN_ITEM / "metadata"
        run = json.loads(run_file.read_text()) if run_file.exists() else None
    except Exception as error:  # noqa: BLE001 - Orbax/TensorStore raise many types
        raise DamagedCheckpointError(f"{where} cannot be read: {_short(error)}") from error
    if integrity is None:
        logging.warning("%s has no checksums (written by an older version): not verified", where)
    else:
        verify(restored, integrity.get("checksums"), where)
    for key in prefix:
        restored = restored[key]
    return restored, run
