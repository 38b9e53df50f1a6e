"""Checkpoints of an evaluation's training (linear heads, a fine-tuned network), so that the same
command resumes it after SIGTERM or a crash instead of starting the unit again.

A *unit* is one training run of a protocol: the whole LR grid of linear evaluation (one pass
trains every head), one point of a fine-tuning sweep. Its steps live in
``<workdir>/checkpoints/<unit name>/`` and are verified like training checkpoints
(:mod:`byol_flax.checkpointing.verified`): a checksum per array, a damaged step named and the
previous one used, a step of another evaluation (other encoder, config or grid) refused as
incompatible. Each step holds the state (parameters, optimizer state, RNG, last loss), the step
and the data iterator's position.
"""

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.checkpointing.verified import (
    DAMAGED_SUFFIX,
    INTEGRITY_ITEM,
    RUN_ITEM,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    layout_differences,
    metadata_tree,
    short_error,
    state_checksums,
    verify,
)
from byol_flax.config import Role, flatten_dotted
from byol_flax.errors import UserError

# Roles of the evaluation config's own keys (byol_flax.evaluation.config): runtime keys change
# nothing measured, so neither stored sweep points nor checkpoints compare them. Every other key
# is trained.
EVAL_KEY_ROLES: dict[str, Role] = {"name": Role.RUNTIME, "checkpoint_every_steps": Role.RUNTIME,
                                   "features_cache": Role.RUNTIME}


class EvaluationStopped(UserError, RuntimeError):
    """SIGTERM stopped an evaluation after its checkpoint committed: the same command resumes."""


def measured_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The evaluation config without its runtime keys: what changes a measured score."""
    settings = config.to_dict()
    for key, role in EVAL_KEY_ROLES.items():
        if role is Role.RUNTIME:
            settings.pop(key, None)
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_digest(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(json.dumps(measured_settings(config), sort_keys=True).encode()
                          ).hexdigest()


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    """({"<index>_<path>": leaf}, treedef): any pytree as the flat dict a checkpoint stores."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = {}
    for index, (path, leaf) in enumerate(leaves):
        label = re.sub(r"[^A-Za-z0-9]+", "_", jax.tree_util.keystr(path)).strip("_")
        named[f"{index:04d}_{label}"[:120]] = leaf
    return named, treedef


@dataclasses.dataclass
class Resumed:
    """Where a unit starts: its step (0: from scratch), state and data iterator position."""

    step: int
    tree: Any
    data_state: dict[str, Any] | None


class UnitCheckpoints:
    """The checkpoints of one training unit; without a directory, a no-op that still honours
    SIGTERM by stopping (nothing to resume from then)."""

    def __init__(self, directory: epath.PathLike | None, record: dict[str, Any], *,
                 every_steps: int, total_steps: int,
                 termination: TerminationGuard | None = None):
        self._directory = epath.Path(directory) if directory else None
        self._record = json.loads(json.dumps(record, sort_keys=True, default=str))
        self._every = every_steps
        self._total = total_steps
        self._termination = termination
        self._manager: ocp.CheckpointManager | None = None

    @property
    def directory(self) -> epath.Path | None:
        return self._directory

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self._directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=2, enable_async_checkpointing=False,
                    cleanup_tmp_directories=True, create=True),
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               RUN_ITEM: ocp.JsonCheckpointHandler(),
                               INTEGRITY_ITEM: ocp.JsonCheckpointHandler()})
        return self._manager

    def restore(self, template: Any) -> Resumed:
        """The newest valid step shaped like ``template`` (step 0 and ``template`` when there is
        none). A step of a finished unit of the same sweep (another point) is removed; one of
        another evaluation raises :class:`IncompatibleCheckpointError`."""
        if self._directory is None or not self._directory.exists():
            return Resumed(0, template, None)
        manager = self._open()
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            return Resumed(0, template, None)
        self._check_record(steps[0])
        if self._manager is None:  # the directory held another point's finished unit
            return Resumed(0, template, None)
        flat, treedef = _flat(template)
        damaged = []
        for step in steps:
            try:
                restored, integrity = self._read(step, flat)
            except DamagedCheckpointError as error:
                logging.error("%s; trying the previous checkpoint", error)
                damaged.append(step)
                continue
            for bad in damaged:
                (self._directory / str(bad)).rename(
                    self._directory / f"{bad}{DAMAGED_SUFFIX}-{time.time():.0f}")
            if damaged:
                manager.reload()
                logging.warning("resumed %s from step %d; damaged steps %s were moved aside",
                                self._directory, step, damaged)
            tree = jax.tree_util.tree_unflatten(treedef, [restored[k] for k in flat])
            return Resumed(step, tree, integrity.get("data"))
        raise DamagedCheckpointError(
            f"no restorable evaluation checkpoint in {self._directory}: steps {damaged} are "
            "damaged (left in place); delete the directory to train this unit from scratch")

    def _check_record(self, step: int) -> None:
        where = f"evaluation checkpoint step {step} in {self._directory}"
        try:
            saved = self._manager.restore(step, args=ocp.args.Composite(
                **{RUN_ITEM: ocp.args.JsonRestore()}))[RUN_ITEM]
        except Exception as error:
            raise DamagedCheckpointError(f"{where} cannot be read: {short_error(error)}") from error
        if saved == self._record:
            return
        ours, theirs = flatten_dotted(self._record), flatten_dotted(saved)
        differences = sorted(k for k in ours.keys() | theirs.keys()
                             if ours.get(k) != theirs.get(k))
        if all(key.startswith("points") for key in differences):
            logging.info("%s belongs to another point of this sweep: removed", where)
            self.discard()
            return
        shown = [f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}"
                 for k in differences[:6]]
        raise IncompatibleCheckpointError(
            f"{where} is intact but was written by another evaluation ({'; '.join(shown)}): "
            "re-run with the config it was written with to finish it, or delete that directory "
            "(or use a new --workdir) to start this one")

    def _read(self, step: int, flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        where = f"evaluation checkpoint step {step} in {self._directory}"
        try:
            layout = metadata_tree(self._manager.item_metadata(step)["state"])
        except Exception as error:
            raise DamagedCheckpointError(f"{where} cannot be read: {short_error(error)}") from error
        differences = layout_differences(layout, flat)
        if differences:
            raise IncompatibleCheckpointError(
                f"{where} is intact but holds another state layout: {'; '.join(differences[:6])}"
                "; delete that directory (or use a new --workdir) to start this evaluation")
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in flat.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                **{INTEGRITY_ITEM: ocp.args.JsonRestore()}))
            state, integrity = restored["state"], restored[INTEGRITY_ITEM]
            checksums = integrity["checksums"]
        except Exception as error:
            raise DamagedCheckpointError(f"{where} cannot be read: {short_error(error)}") from error
        verify(state, checksums, where)
        return state, integrity

    def maybe_save(self, step: int, tree: Any, data_state: Callable[[], Any]) -> None:
        """Called after every step: saves every ``every_steps``, at the last step and on SIGTERM
        (then raises :class:`EvaluationStopped` once the save committed)."""
        stopping = self._termination is not None and self._termination.requested
        if self._directory is not None:
            stopping = stopping or self._open().reached_preemption(step)
        due = (self._every and step % self._every == 0) or step == self._total
        if self._directory is not None and (stopping or due):
            self.save(step, tree, data_state())
        if stopping:
            where = (f"; checkpoint of step {step} committed in {self._directory}: re-run the "
                     "same command to resume" if self._directory else " (no checkpoint directory)")
            raise EvaluationStopped(f"evaluation stopped by SIGTERM at step {step} of "
                                    f"{self._total}{where}")

    def save(self, step: int, tree: Any, data_state: Any) -> None:
        flat, _ = _flat(tree)
        integrity = {"checksums": state_checksums(flat), "step": step, "data": data_state}
        self._open().save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity),
               RUN_ITEM: ocp.args.JsonSave(self._record)}))
        self._manager.wait_until_finished()

    def discard(self) -> None:
        """Removes this unit's steps (process 0; its result is recorded elsewhere)."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        if self._directory is not None and self._directory.exists() and \
                jax.process_index() == 0:
            self._directory.rmtree()

    def __enter__(self) -> "UnitCheckpoints":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None
