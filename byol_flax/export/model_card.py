"""The model card of an exported encoder: ``model_card.json`` and its rendering ``MODEL_CARD.md``.

It records what a release of a self-supervised encoder must say (the documentation points of
``byol_wiki.txt``): pre-training data source with its manifest checksum, augmentation recipe,
architecture and parameter count, checkpoint, objective and predictor variant, steps and epochs,
the whole pre-training config, every evaluation result with its splits, and the intended uses,
out-of-scope uses and known failure domains that only the person releasing it can state.
"""

import datetime
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from etils import epath

from byol_flax.data.records import MANIFEST_NAME
from byol_flax.export.encoder import (PretrainedEncoder, SourceError, export_encoder,
                                      load_pretraining_encoder, load_source)
from byol_flax.models.byol import count_params

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
RESULTS_NAME = "results.json"  # what an evaluation workdir holds
NOT_STATED = "not stated by the exporter: fill in before any release (byol_flax.export flags)"


def _data_source(pretrain_config: dict[str, Any] | None) -> dict[str, Any]:
    """Dataset name, converter and the sha256 of the manifest (which lists every shard's sha256)."""
    if not pretrain_config:
        return {"note": "pre-training config not found next to the checkpoint"}
    data = pretrain_config.get("data", {})
    source: dict[str, Any] = {"dir": data.get("dir"), "train_split": data.get("train_split"),
                              "image_size": data.get("image_size")}
    manifest_file = epath.Path(data.get("dir") or "/nonexistent") / MANIFEST_NAME
    if manifest_file.exists():
        text = manifest_file.read_bytes()
        manifest = json.loads(text)
        split = manifest.get("splits", {}).get(data.get("train_split"), {})
        source.update(dataset=manifest.get("dataset"), converter=manifest.get("source"),
                      manifest_sha256=hashlib.sha256(text).hexdigest(),
                      train_records=split.get("num_records"),
                      splits={name: s.get("num_records")
                              for name, s in manifest.get("splits", {}).items()})
    else:
        source["note"] = f"{manifest_file} not readable at export time: checksum not recorded"
    return source


def _describe_loss(loss: dict[str, Any]) -> str:
    """The pre-training objective in words (Eq. 5 / G.6 variants named when not BYOL's)."""
    text = "2 - 2 cos(q(z_online), z_target), symmetrised over the two views"
    if loss.get("beta"):
        text = (f"-InfoNCE of Eq. 5 with beta={loss['beta']}, alpha={loss.get('temperature')}, "
                "symmetrised over the two views")
    if loss.get("normalization", "l2") != "l2":
        text += f"; normalisation {loss['normalization']} (Appendix G.6)"
    return text


def build_model_card(pretrained: PretrainedEncoder, *, intended_use: str = "",
                     out_of_scope_use: str = "", known_failures: str = "") -> dict[str, Any]:
    """The card's content as a JSON-able dict (evaluations start empty; see add_evaluation)."""
    config = pretrained.pretrain_config or {}
    model = pretrained.model_config
    data = _data_source(config)
    step = pretrained.origin.get("step")
    training = config.get("training", {})
    examples = training.get("num_train_examples") or data.get("train_records")
    epochs = (step * training["batch_size"] / examples
              if step is not None and examples and training.get("batch_size") else None)
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": pretrained.origin,
        "architecture": {
            "encoder": model["encoder"],
            "representation_size": pretrained.encoder.num_features,
            "encoder_parameters": count_params(pretrained.encoder),
            "batchnorm": model.get("batchnorm"),
            "compute_dtype": model.get("compute_dtype"),
        },
        "objective": {
            "method": "BYOL (Grill et al., NeurIPS 2020)",
            "loss": _describe_loss(config.get("loss") or {}),
            "projector": model.get("projector"),
            "predictor": model.get("predictor"),
            "target": config.get("target"),
            "optimizer": config.get("optimizer"),
        },
        "training": {"steps": step, "epochs": epochs, "batch_size": training.get("batch_size"),
                     "configured_epochs": training.get("epochs"), "seed": config.get("seed")},
        "pretraining_data": data,
        "augmentations": config.get("augment"),
        "intended_use": intended_use or NOT_STATED,
        "out_of_scope_use": out_of_scope_use or NOT_STATED,
        "known_failure_domains": known_failures or NOT_STATED,
        "evaluations": [],
        # Config keys changed on resume with --allow_config_change (and runtime changes), in
        # order: the recipe actually trained is the config above as changed at these steps.
        "config_history": config.get("config_history", []),
        "pretrain_config": config,
    }


def add_evaluation(card: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Adds (or replaces: same protocol, name, data and splits) one evaluation result."""
    identify = lambda e: (e["protocol"], e.get("name", ""), e.get("data_dir", ""),  # noqa: E731
                          e.get("test_split", ""), json.dumps(e.get("source", {}), sort_keys=True))
    kept = [e for e in card["evaluations"] if identify(e) != identify(result)]
    card["evaluations"] = kept + [result]
    return card


def _evaluation_rows(card: dict[str, Any]) -> list[str]:
    rows = ["| protocol | name | metric | test split | test | selection split | chosen |",
            "|---|---|---|---|---|---|---|"]
    for e in card["evaluations"]:
        test = e.get("test", {})
        for metric, value in sorted(test.items()):
            rows.append(f"| {e['protocol']} | {e.get('name', '')} | {metric} | "
                        f"{e.get('test_split', '')} | {value:.4f} | "
                        f"{e.get('selection_split', '-')} | {json.dumps(e.get('selected', {}))} |")
    return rows if len(rows) > 2 else ["No evaluation recorded yet: run `python -m "
                                       "byol_flax.evaluation --config=eval_<x>:<protocol> "
                                       "--source=<this directory> --workdir=DIR`."]


def _history_rows(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return ["None: trained start to end with the config above."]
    rows = ["| step | kind | key | old | new |", "|---|---|---|---|---|"]
    rows += [f"| {h['step']} | {h['kind']} | {h['key']} | {json.dumps(h['old'])} | "
             f"{json.dumps(h['new'])} |" for h in history]
    return rows


def _loader(card: dict[str, Any]) -> str:
    if card.get("export", {}).get("format") == "torch":
        from byol_flax.export.torch_format import LOADER
        return LOADER
    return ("`from byol_flax.export.encoder import load_encoder; encoder = load_encoder(DIR); "
            "encoder.eval()`")


def render_markdown(card: dict[str, Any]) -> str:
    arch, data, training = card["architecture"], card["pretraining_data"], card["training"]
    lines = [
        "# Model card: BYOL encoder",
        "",
        f"Created {card['created']} from `{json.dumps(card['checkpoint'])}`.",
        "",
        "## Intended use",
        card["intended_use"],
        "",
        "## Out-of-scope use",
        card["out_of_scope_use"],
        "",
        "## Known failure domains",
        card["known_failure_domains"],
        "",
        "## Architecture",
        f"- Encoder: `{json.dumps(arch['encoder'])}`, representation size "
        f"{arch['representation_size']}, {arch['encoder_parameters']:,} parameters "
        f"(BatchNorm statistics excluded), compute dtype {arch['compute_dtype']}.",
        f"- Load it: {_loader(card)}.",
        "",
        "## Objective",
        f"- {card['objective']['method']}; loss {card['objective']['loss']}.",
        f"- Projector `{json.dumps(card['objective']['projector'])}`, predictor "
        f"`{json.dumps(card['objective']['predictor'])}`, target "
        f"`{json.dumps(card['objective']['target'])}`.",
        "",
        "## Pre-training",
        f"- Steps {training['steps']}, epochs {training['epochs']}, batch "
        f"{training['batch_size']}, seed {training['seed']}.",
        f"- Data: `{json.dumps({k: v for k, v in data.items() if k != 'converter'})}`.",
        f"- Augmentations: `{json.dumps(card['augmentations'])}`.",
        "",
        "## Config changes during pre-training",
        *_history_rows(card.get("config_history", [])),
        "",
        "## Evaluations",
        *_evaluation_rows(card),
        "",
        f"The full pre-training config is in `{CARD_JSON}` under `pretrain_config`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(directory: epath.PathLike, card: dict[str, Any]) -> None:
    directory = epath.Path(directory)
    (directory / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True))
    (directory / CARD_MARKDOWN).write_text(render_markdown(card))


def read_model_card(directory: epath.PathLike) -> dict[str, Any]:
    return json.loads((epath.Path(directory) / CARD_JSON).read_text())


def export_with_model_card(workdir: str | None, out: str, *, source: str | None = None,
                           step: int | None = None, results: Sequence[str] = (),
                           export_format: str = "byol_flax", intended_use: str = "",
                           out_of_scope_use: str = "", known_failures: str = "") -> epath.Path:
    """Exports the encoder of pre-training ``workdir`` (at ``step``), or of ``source`` (anything
    the evaluation's ``--source`` names: an export directory, e.g. an imported official
    checkpoint), to ``out`` with its model card, adding the ``results.json`` of the evaluation
    workdirs ``results``. ``export_format``: ``byol_flax`` (Orbax arrays, ``load_encoder``) or
    ``torch`` (``encoder.safetensors`` with torchvision's keys, written without torch)."""
    if (workdir is None) == (source is None):
        raise SourceError("export: name exactly one of a pre-training workdir or a source")
    if step is not None and workdir is None:
        raise SourceError("--step picks a checkpoint of --workdir; it does not apply to --source")
    pretrained = load_pretraining_encoder(workdir, step) if workdir else load_source(source)
    card = build_model_card(pretrained, intended_use=intended_use,
                            out_of_scope_use=out_of_scope_use, known_failures=known_failures)
    for directory in results:
        card = add_evaluation(
            card, json.loads((epath.Path(directory) / RESULTS_NAME).read_text()))
    write_card = lambda staging: write_model_card(staging, card)  # noqa: E731
    if export_format == "torch":
        from byol_flax.export import torch_format  # imports safetensors, only when asked for
        card["export"] = {"format": "torch", "file": torch_format.WEIGHTS_NAME,
                          **torch_format.architecture(pretrained)}
        return torch_format.export_torch(pretrained, out, write_extra=write_card)
    return export_encoder(pretrained, out, write_extra=write_card)
