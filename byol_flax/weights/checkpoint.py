"""The online encoder of a pre-training checkpoint, as evaluation and export read it.

Read the way training reads a checkpoint: committed steps only, every array checked against its
checksum, a damaged newest step skipped with a warning. Only the encoder's arrays leave the disk
(Orbax partial restore, shaped as the step recorded them): the optimizer state, target, projector
and predictor stay there. Building the ``nnx.Module`` from them is the caller's part
(:func:`byol_flax.export.encoder.load_pretraining_encoder`).
"""

import dataclasses
from typing import Any

from etils import epath

from byol_flax.checkpointing import DamagedCheckpointError, config_changes, read_verified
from byol_flax.storage import json_files, schemas

ENCODER_PREFIX = ("online", "encoder")  # where the encoder lives in the saved TrainState


@dataclasses.dataclass
class EncoderCheckpoint:
    """One verified step's online encoder and what it was trained with."""

    step: int
    # The encoder's parameters and BatchNorm statistics as a pure dict, keyed as Orbax stores it
    # (list indices as strings, which nnx.replace_by_pure_dict accepts).
    arrays: dict[str, Any]
    model_config: dict[str, Any]  # config.model saved with the step
    # The run's config saved with the step plus "config_history" (the workdir's recorded
    # changes up to the step).
    pretrain_config: dict[str, Any]


def read_encoder(workdir: epath.PathLike, step: int | None = None) -> EncoderCheckpoint:
    """The online encoder of ``workdir/checkpoints`` at ``step`` (the newest valid one by
    default). Raises :class:`DamagedCheckpointError` when no step is committed, the requested
    step is damaged, or every step is.

    The pre-training config is the one saved with that step (what it was trained with).
    """
    workdir = epath.Path(workdir)
    directory = workdir / "checkpoints"
    step, arrays, run = read_verified(directory, prefix=ENCODER_PREFIX, step=step)
    model_file = directory / str(step) / "model_config" / "metadata"
    try:
        # {"model": config.model, "target": {...}}, as Checkpointer saves it.
        model_config = json_files.read(model_file, spec=schemas.Obj({"model": dict}),
                                       what="checkpoint metadata")["model"]
    except OSError as error:
        raise DamagedCheckpointError(f"{model_file}: the model config of checkpoint step {step} "
                                     f"cannot be read: {error}") from error
    pretrain_config = {**run["config"],
                       "config_history": config_changes.read_history(workdir, step)}
    return EncoderCheckpoint(step, arrays, model_config, pretrain_config)
