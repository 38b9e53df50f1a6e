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
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding


# Keys of config.model that change how the network is computed or initialised, not what a
# checkpoint holds: it restores under any of their values, so they are left out of the saved
# model config (dotted paths within config.model).
RUNTIME_MODEL_KEYS = ("conv_implementation", "encoder.zero_init_residual")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the work directory was written by a different model config."""


class DamagedCheckpointError(IOError):
    """A checkpoint step cannot be read back exactly (missing, truncated or altered files)."""


INTEGRITY_ITEM = "integrity"
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
    flat = _flatten(pure_state)
    values = jax.device_get(_checksums([jnp.asarray(v) for v in flat.values()]))
    return {key: int(value) for key, value in zip(flat, values)}


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
        model = json.loads(config.model.to_json())
        for key in RUNTIME_MODEL_KEYS:
            *parents, name = key.split(".")
            section = model
            for parent in parents:
                section = section.get(parent, {})
            section.pop(name, None)
        self._model_config = {"model": model, "target": {"kind": config.target.kind}}
        self.manager = ocp.CheckpointManager(
            epath.Path(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "model_config": ocp.JsonCheckpointHandler(),
                           INTEGRITY_ITEM: ocp.JsonCheckpointHandler()})

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, data_iterator: Any, *, force: bool = False,
             counters: dict[str, int] | None = None) -> None:
        """Starts an asynchronous save of ``state``, the iterator position and ``counters`` (the
        loop's running totals, e.g. skipped records) at ``step``."""
        pure = nnx.to_pure_dict(state)
        integrity = {"checksums": state_checksums(pure), "counters": dict(counters or {})}
        self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(pure),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            model_config=ocp.args.JsonSave(self._model_config),
            **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}))

    def check_compatible(self, step: int) -> None:
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                model_config=ocp.args.JsonRestore()))["model_config"]
        except Exception as error:  # an empty or half-deleted step directory
            raise DamagedCheckpointError(
                f"checkpoint step {step} in {self.manager.directory} cannot be read: "
                f"{type(error).__name__}: {str(error)[:300]}") from error
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
                sharding: NamedSharding) -> tuple[nnx.State, dict[str, int]]:
        """Restores ``step`` into the structure of ``state`` (placed with ``sharding``, which may
        come from a mesh of another size), moves ``data_iterator`` to the saved position and
        returns the state and the saved counters.

        Raises :class:`DamagedCheckpointError` naming the step when its files cannot be read or
        its arrays differ from the checksums written with them.
        """
        logging.info("restoring checkpoint step %d from %s", step, self.manager.directory)
        self.check_compatible(step)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                nnx.to_pure_dict(state))
        where = f"checkpoint step {step} in {self.manager.directory}"
        # Checkpoints of versions before checksums have no integrity item: read, not verified.
        has_integrity = (epath.Path(self.manager.directory) / str(step) / INTEGRITY_ITEM).exists()
        items = {INTEGRITY_ITEM: ocp.args.JsonRestore()} if has_integrity else {}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(data_iterator), **items))
        except Exception as error:  # Orbax/TensorStore raise many types for unreadable files
            raise DamagedCheckpointError(f"{where} cannot be read: {type(error).__name__}: "
                                         f"{str(error)[:300]}") from error
        integrity = (restored[INTEGRITY_ITEM] or {}) if has_integrity else {}
        if not has_integrity:
            logging.warning("%s has no checksums (written by an older version): not verified",
                            where)
        expected = integrity.get("checksums")
        actual = state_checksums(restored["state"]) if expected is not None else {}
        altered = sorted(k for k in actual if expected.get(k) != actual[k])
        if altered:
            raise DamagedCheckpointError(
                f"{where} is damaged: {len(altered)} array(s) differ from the checksums saved "
                f"with them, e.g. {altered[:3]}")
        nnx.replace_by_pure_dict(state, restored["state"])
        logging.info("restored %s", where)
        return state, dict(integrity.get("counters", {}))

    def restore_latest(self, state: nnx.State, data_iterator: Any, sharding: NamedSharding
                       ) -> tuple[int | None, nnx.State, dict[str, int]]:
        """Restores the newest valid step: (step or None if there is none, state, counters).

        A damaged step is logged, renamed to ``<step>.damaged`` (kept for inspection; the run
        will write that step again) and the previous one tried. If steps exist but none is
        valid the run stops: starting from scratch would silently discard the job's progress.
        """
        damaged = []
        self.manager.reload()  # the steps on disk now, not those cached at construction
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, counters = self.restore(step, state, data_iterator, sharding)
            except DamagedCheckpointError as error:
                logging.error("%s; trying the previous checkpoint", error)
                damaged.append(step)
                continue
            for bad in damaged:  # only once a valid step is found: nothing moves on a bad day
                self._move_aside(bad)
            if damaged:
                logging.warning("resumed from step %d; damaged steps %s were moved aside to "
                                "<step>%s-<time>", step, damaged, DAMAGED_SUFFIX)
            return step, state, counters
        if damaged:
            raise DamagedCheckpointError(
                f"no restorable checkpoint in {self.manager.directory}: steps {damaged} are "
                "damaged (left in place). Restore them from a copy, or move them away to start "
                "the run from scratch.")
        return None, state, {}

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            directory = epath.Path(self.manager.directory)
            (directory / str(step)).rename(directory / f"{step}{DAMAGED_SUFFIX}-{time.time():.0f}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any of them got a preemption notice (multi-host)."""
        return self.manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
