"""Runs one evaluation protocol on one source and records the result (the CLI's body)."""

import json
import logging
import os

import jax
import ml_collections
from clu import metric_writers
from etils import epath

from byol_flax.export import model_card
from byol_flax.evaluation.config import validate_eval_config
from byol_flax.export.encoder import ENCODER_CONFIG_NAME, RANDOM_PREFIX, load_source
from byol_flax.evaluation import SweepStore, run_protocol
from byol_flax.sharding import make_mesh

def evaluate(config: ml_collections.ConfigDict, source: str, workdir: str) -> dict:
    """Runs one protocol on ``source``; returns and writes its result."""
    validate_eval_config(config, num_devices=jax.device_count())
    workdir = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    pretrained = load_source(source, seed=config.seed, image_size=config.data.image_size)
    result = run_protocol(config, pretrained, make_mesh(), SweepStore(workdir / "sweep"))
    (workdir / model_card.RESULTS_NAME).write_text(json.dumps(result, indent=2, sort_keys=True))

    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    for index, row in enumerate(result["sweep"]):
        writer.write_scalars(index, {f"selection/{k}": v for k, v in row["selection"].items()})
        writer.write_hparams({**row["point"], "sweep_index": index})
    writer.write_scalars(0, {f"test/{k}": v for k, v in result["test"].items()})
    writer.flush()

    export_dir = epath.Path(source.removeprefix(RANDOM_PREFIX))
    if not source.startswith(RANDOM_PREFIX) and (export_dir / ENCODER_CONFIG_NAME).exists() \
            and (export_dir / model_card.CARD_JSON).exists():
        card = model_card.add_evaluation(model_card.read_model_card(export_dir), result)
        model_card.write_model_card(export_dir, card)
        logging.info("added the result to the model card in %s", export_dir)
    logging.info("%s on %s: test %s (selected %s on %s)", result["protocol"], source,
                 result["test"], result["selected"], result["selection_split"])
    return result
