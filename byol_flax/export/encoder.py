"""The pre-trained encoder written as an export directory (its format and reader:
:mod:`byol_flax.weights.encoder`), replacing an earlier export only when complete.
"""

import logging
import os
from collections.abc import Callable, Sequence

import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from byol_flax.runtime.outputs import check_output_dir, write_marker
from byol_flax.storage import json_files
from byol_flax.weights.encoder import (
    CHECKSUMS_KEY,
    ENCODER_CONFIG_NAME,
    EXPORT_FORMAT_VERSION,
    HEADS_DIR,
    WEIGHTS_DIR,
    PretrainedEncoder,
    array_checksums,
    load_encoder,  # noqa: F401 - its documented path before byol_flax.weights
)


def export_encoder(pretrained: PretrainedEncoder, out_dir: epath.PathLike,
                   write_extra: Callable[[epath.Path], None] | None = None, *,
                   inputs: Sequence[str] = ()) -> epath.Path:
    """Writes ``encoder/`` and ``encoder_config.json`` (and whatever ``write_extra(directory)``
    adds, e.g. the model card: :func:`byol_flax.export.model_card.write_model_card`) to
    ``out_dir``, atomically: everything is written to a temporary directory beside it that then
    replaces ``out_dir``, so a failed export leaves the previous one intact. ``out_dir`` must
    be new, empty or a previous export, and outside ``inputs`` (the paths read):
    :func:`byol_flax.runtime.outputs.check_output_dir`."""
    def write(staging: epath.Path) -> None:
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        encoder_arrays = nnx.to_pure_dict(nnx.state(pretrained.encoder))
        checkpointer.save(staging / WEIGHTS_DIR, args=ocp.args.PyTreeSave(encoder_arrays))
        checksums = {WEIGHTS_DIR: array_checksums(encoder_arrays)}
        heads = pretrained.heads()
        if heads:
            head_arrays = {name: nnx.to_pure_dict(nnx.state(module))
                           for name, module in heads.items()}
            checkpointer.save(staging / HEADS_DIR, args=ocp.args.PyTreeSave(head_arrays))
            checksums[HEADS_DIR] = array_checksums(head_arrays)
        checkpointer.close()
        origin = {("source_" + k if k in ("kind", "path") else k): v
                  for k, v in pretrained.origin.items() if k != "fingerprint"}
        json_files.write(staging / ENCODER_CONFIG_NAME, {
            "format_version": EXPORT_FORMAT_VERSION,
            "model": pretrained.model_config,
            "origin": origin,
            "pretrain_config": pretrained.pretrain_config,
            "heads": {name: ({"num_classes": module.out_features} if name == "classifier" else {})
                      for name, module in heads.items()},
            CHECKSUMS_KEY: checksums,
        }, indent=2, sort_keys=True, what="export config")
        if write_extra is not None:
            write_extra(staging)

    out_dir = write_atomically(out_dir, write, inputs=inputs)
    logging.info("exported the encoder of %s to %s", pretrained.origin, out_dir)
    return out_dir


def write_atomically(out_dir: epath.PathLike, write: Callable[[epath.Path], None], *,
                     inputs: Sequence[str] = ()) -> epath.Path:
    """Runs ``write(staging)`` on a temporary directory beside ``out_dir`` that then replaces
    ``out_dir``: a failed export leaves the previous one intact (every export format). Only a
    new or empty ``out_dir`` or a previous export is replaced
    (:func:`byol_flax.runtime.outputs.check_output_dir`, with ``inputs`` the paths read)."""
    out_dir = check_output_dir(out_dir, "export", inputs=inputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    if staging.exists():
        staging.rmtree()
    staging.mkdir()
    try:
        write(staging)
        write_marker(staging, "export")
        _swap_in(staging, out_dir)
    except BaseException:
        if staging.exists():
            staging.rmtree()
        raise
    return out_dir


def _swap_in(staging: epath.Path, out_dir: epath.Path) -> None:
    """Replaces ``out_dir`` by the complete ``staging`` directory; the old one is removed only
    once the new one is in place."""
    previous = out_dir.parent / f".{out_dir.name}.export-old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(previous)
    try:
        staging.rename(out_dir)
    except BaseException:
        if previous.exists() and not out_dir.exists():
            previous.rename(out_dir)
        raise
    if previous.exists():
        previous.rmtree()
