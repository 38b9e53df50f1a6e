"""Runs one evaluation protocol on one source and records the result (the CLI's body): finished
sweep points under ``<workdir>/sweep``, the unfinished training unit's checkpoints under
``<workdir>/checkpoints`` (:mod:`byol_flax.evaluation.resumable`)."""

import logging

import jax
import ml_collections
from etils import epath

from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.evaluation.base import SweepStore
from byol_flax.evaluation.config import validate_eval_config
from byol_flax.evaluation.evaluators import build_evaluator
from byol_flax.evaluation.feature_cache import FeatureCache
from byol_flax.evaluation.features import FeatureStore
from byol_flax.export import model_card
from byol_flax.runtime import logs
from byol_flax.runtime.outputs import claim_output_dir
from byol_flax.sharding import make_mesh
from byol_flax.storage import files, json_files, tensorboard
from byol_flax.weights.encoder import ENCODER_CONFIG_NAME, load_source


def evaluate(config: ml_collections.ConfigDict, source: str, workdir: str, *,
             log_to_workdir: bool = False) -> dict:
    """Runs one protocol on ``source``; returns and writes its result (in ``workdir`` only:
    a new, empty or earlier evaluation directory, outside an export it reads).
    ``log_to_workdir`` (the command): the log goes to ``<workdir>/log.txt`` once the workdir is
    claimed and written (a refused folder gets no log file)."""
    validate_eval_config(config, num_devices=jax.device_count())
    export_read = source if (epath.Path(source) / ENCODER_CONFIG_NAME).exists() else ""
    workdir = claim_output_dir(workdir, "evaluation", inputs=[export_read])
    files.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    if log_to_workdir:  # after the first write: a workdir that refuses it gets no log file
        logs.setup(workdir)
    pretrained = load_source(source, seed=config.seed, image_size=config.data.image_size)
    # SIGTERM ends a training unit with a checkpoint (EvaluationStopped); the same command then
    # resumes it. Under jax.distributed Orbax's preemption sync point does that instead.
    termination = TerminationGuard(enabled=jax.process_count() == 1)
    try:
        features = (FeatureStore(FeatureCache(workdir / "features")) if config.features_cache
                    else None)
        store = SweepStore(workdir / "sweep", checkpoints=workdir / "checkpoints",
                           termination=termination, features=features)
        result = build_evaluator(config, make_mesh(), store=store).run(pretrained)
    finally:
        termination.restore()
    json_files.write(workdir / model_card.RESULTS_NAME, result, indent=2, sort_keys=True,
                     what="evaluation result")

    writer = tensorboard.create_writer(workdir, just_logging=jax.process_index() > 0)
    for index, row in enumerate(result["sweep"]):
        writer.write_scalars(index, {f"selection/{k}": v for k, v in row["selection"].items()})
        writer.write_hparams({**row["point"], "sweep_index": index})
    writer.write_scalars(0, {f"test/{k}": v for k, v in result["test"].items()})
    writer.close()

    if export_read:  # never written into: evaluation reads it
        logging.info("record this result in the export's model card with: byol-add-results "
                     "--export=%s --results=%s", source, workdir)
    logging.info("%s on %s: test %s (selected %s on %s)", result["protocol"], source,
                 result["test"], result["selected"], result["selection_split"])
    return result
