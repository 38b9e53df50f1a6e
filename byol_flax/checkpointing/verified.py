"""What every checkpoint reader shares: the errors, the checksums and layouts of a state, and
the verified readers of one step that evaluation and export use.

*Damaged* means the files of a step cannot be read back exactly; *incompatible* means they
verify but describe another run (nothing is moved). The :class:`Checkpointer` that writes the
steps and restores a run is :mod:`byol_flax.checkpointing.checkpointer`.
"""

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from byol_flax.config import flatten_dotted
from byol_flax.errors import UserError
from byol_flax.storage import json_files, schemas


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


def short_error(error: BaseException) -> str:
    """One line for an exception raised deep inside Orbax or TensorStore."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


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


def metadata_tree(metadata: Any) -> dict[str, Any]:
    """Orbax's state metadata as a nested dict of objects with ``shape`` and ``dtype``."""
    tree = getattr(metadata, "tree", metadata)
    return tree if isinstance(tree, dict) else dict(tree)


def stored_layout(path: epath.PathLike) -> dict[str, Any]:
    """The shapes and dtypes a PyTree checkpoint at ``path`` recorded (nested dict of objects
    with ``shape`` and ``dtype``), read without loading an array: what
    :func:`layout_differences` compares."""
    return metadata_tree(ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)))


def verify(pure_state: dict[str, Any], expected: dict[str, int], where: str) -> None:
    """Raises :class:`DamagedCheckpointError` if an array of ``pure_state`` differs from its saved
    checksum. ``pure_state`` may be a part of the saved state: keys absent from it are skipped."""
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
                  ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Reads the arrays stored under ``prefix`` of the state of a committed step (the newest
    valid one by default), shaped as the step recorded them and verified against its checksums:
    (step, arrays, run record). What evaluation and export read
    (:mod:`byol_flax.weights.checkpoint`).

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
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    where = f"checkpoint {step_dir}"
    try:
        # The shapes and dtypes Orbax recorded with the step, under ``prefix``.
        target = stored_layout(step_dir / "state")
        for key in prefix:
            target = target[key]
        restored = read_pytree(step_dir / "state", target, prefix)
        checksums = json_files.read(step_dir / INTEGRITY_ITEM / "metadata",
                                    spec=schemas.Obj({"checksums": dict}),
                                    what="checkpoint metadata")["checksums"]
        run = json_files.read(step_dir / RUN_ITEM / "metadata", spec=dict,
                              what="checkpoint metadata")
    except Exception as error:
        raise DamagedCheckpointError(f"{where} cannot be read: {short_error(error)}") from error
    verify(restored, checksums, where)
    for key in prefix:
        restored = restored[key]
    return restored, run
