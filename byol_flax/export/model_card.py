"""The model card of an exported encoder: ``model_card.json`` and its rendering ``MODEL_CARD.md``.

It records what a release of a self-supervised encoder must say (the documentation points of
``byol_wiki.txt``): pre-training data source with its manifest checksum, augmentation recipe,
architecture and parameter count, checkpoint, objective and predictor variant, steps and epochs,
the whole pre-training config, every evaluation result with its splits, the code (version and
commit) the checkpoint was trained with and every change of it on resume, and the intended
uses, out-of-scope uses and known failure domains that only the person releasing it can state.

Text that comes from files or flags (the uses, names of evaluations, any config value) is
rendered inert: control characters and line breaks are shown escaped and Markdown/HTML markup
is escaped, so no field can start a line of its own or inject markup. The card is written with
the export; results are added later only by the explicit command :mod:`byol_flax.export.
add_results`, which refuses symbolic links and replaces the card files without following one.
"""

import datetime
import hashlib
import html
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
from etils import epath
from flax import nnx

from byol_flax.checkpointing.config_changes import CODE_KIND, code_at, code_entries
from byol_flax.data.records import MANIFEST_NAME
from byol_flax.export.encoder import export_encoder
from byol_flax.models.byol import count_params
from byol_flax.models.vit import FrozenParam
from byol_flax.runtime.code_identity import describe
from byol_flax.runtime.outputs import check_output_dir
from byol_flax.storage import files, json_files, schemas
from byol_flax.weights.encoder import (
    RANDOM_PREFIX,
    PretrainedEncoder,
    SourceError,
    load_pretraining_encoder,
    load_source,
)

CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
RESULTS_NAME = "results.json"  # what an evaluation workdir holds
# A card or a result is a few kB; far above that is not one.
CARD_MAX_BYTES = 16 << 20
NOT_STATED = "not stated by the exporter: fill in before any release (byol_flax.export flags)"
_MARKUP = re.compile(r"([\\`*_\[\]|#~!])")


def inert_text(value: Any) -> str:
    """``value`` as one line of Markdown that renders as its text: non-printable characters
    (line breaks, terminal escapes) shown as Python escapes, HTML and Markdown markup escaped."""
    text = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
                   for char in str(value))
    return _MARKUP.sub(r"\\\1", html.escape(text, quote=False))


def inert_code(value: Any) -> str:
    """``value`` as JSON inside a Markdown code span: ASCII only (control characters escaped by
    JSON), with the backtick and the table bar escaped so the span and a table row stay whole."""
    text = json.dumps(value, sort_keys=True).replace("`", "\\u0060").replace("|", "\\u007c")
    return f"`{text}`"


def _data_source(pretrain_config: dict[str, Any] | None) -> dict[str, Any]:
    """Dataset name, converter and the sha256 of the manifest (which lists every shard's sha256)."""
    if not pretrain_config:
        return {"note": "pre-training config not found next to the checkpoint"}
    data = pretrain_config.get("data", {})
    source: dict[str, Any] = {"dir": data.get("dir"), "train_split": data.get("train_split"),
                              "image_size": data.get("image_size")}
    manifest_file = epath.Path(data.get("dir") or "/nonexistent") / MANIFEST_NAME
    try:
        text = files.read_bytes(manifest_file, what="manifest")
        manifest = json_files.loads(text, name=f"manifest {manifest_file}",
                                    spec=schemas.MANIFEST)
    except OSError as error:  # missing, damaged or not a file: the card says so, not a crash
        manifest = None
        source["note"] = f"{manifest_file} not readable at export time ({error}): checksum " \
                         "not recorded"
    if manifest is not None:
        split = manifest.get("splits", {}).get(data.get("train_split"), {})
        source.update(dataset=manifest.get("dataset"), converter=manifest.get("source"),
                      manifest_sha256=hashlib.sha256(text).hexdigest(),
                      train_records=split.get("num_records"),
                      splits={name: s.get("num_records")
                              for name, s in manifest.get("splits", {}).items()})
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
            # A ViT's untrained arrays (the sin-cos position embedding, a frozen patch projection)
            "frozen_parameters": sum(x.size for x in jax.tree.leaves(
                nnx.state(pretrained.encoder, FrozenParam))),
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
        # The code the checkpoint's step was trained with (None for checkpoints written before
        # code was recorded) and each start or change of it before that step.
        "code": code_at(config.get("config_history", []), step),
        "code_history": code_entries(config.get("config_history", []), step),
        "pretrain_config": config,
    }


def add_evaluation(card: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Adds (or replaces: same protocol, name, data and splits) one evaluation result."""
    identify = lambda e: (e["protocol"], e.get("name", ""), e.get("data_dir", ""),
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
            rows.append(f"| {inert_text(e['protocol'])} | {inert_text(e.get('name', ''))} | "
                        f"{inert_text(metric)} | {inert_text(e.get('test_split', ''))} | "
                        f"{_number(value)} | {inert_text(e.get('selection_split', '-'))} | "
                        f"{inert_code(e.get('selected', {}))} |")
    return rows if len(rows) > 2 else ["No evaluation recorded yet: run `byol-evaluate "
                                       "--config=eval_<x>:<protocol> --source=<this directory> "
                                       "--workdir=DIR`, then `byol-add-results "
                                       "--export=<this directory> --results=DIR`."]


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else inert_text(value)


def _history_rows(history: list[dict[str, Any]]) -> list[str]:
    history = [h for h in history if h.get("kind") != CODE_KIND]  # in the code section
    if not history:
        return ["None: trained start to end with the config above."]
    rows = ["| step | kind | key | old | new |", "|---|---|---|---|---|"]
    rows += [f"| {inert_text(h.get('step'))} | {inert_text(h.get('kind'))} | "
             f"{inert_text(h.get('key'))} | {inert_code(h.get('old'))} | "
             f"{inert_code(h.get('new'))} |" for h in history]
    return rows


def _code_rows(card: dict[str, Any]) -> list[str]:
    """The code trained with, then each recorded start or change of it (step, old -> new)."""
    entries = card.get("code_history") or []
    if not card.get("code"):
        return ["Not recorded: the checkpoint was written before runs recorded their code."]
    rows = [f"- Trained with {inert_text(describe(card['code']))}; in full "
            f"{inert_code(card['code'])}."]
    for h in entries:
        change = (f"{inert_text(describe(h.get('old')))} -> " if h.get("old") else
                  "recorded from here on: ")
        rows.append(f"- Step {inert_text(h.get('step'))}: {change}"
                    f"{inert_text(describe(h.get('new')))}.")
    return rows


def _loader(card: dict[str, Any]) -> str:
    if card.get("export", {}).get("format") == "torch":
        from byol_flax.export.torch_format import loader_text
        return loader_text(card["export"])
    return ("`from byol_flax.export.encoder import load_encoder; encoder = load_encoder(DIR); "
            "encoder.eval()`")


def render_markdown(card: dict[str, Any]) -> str:
    arch, data, training = card["architecture"], card["pretraining_data"], card["training"]
    lines = [
        "# Model card: BYOL encoder",
        "",
        f"Created {inert_text(card['created'])} from {inert_code(card['checkpoint'])}.",
        "",
        "## Intended use",
        inert_text(card["intended_use"]),
        "",
        "## Out-of-scope use",
        inert_text(card["out_of_scope_use"]),
        "",
        "## Known failure domains",
        inert_text(card["known_failure_domains"]),
        "",
        "## Architecture",
        f"- Encoder: {inert_code(arch['encoder'])}, representation size "
        f"{inert_text(arch['representation_size'])}, {arch['encoder_parameters']:,} parameters "
        f"(BatchNorm statistics excluded"
        + (f"; {arch['frozen_parameters']:,} more fixed, not trained" if arch.get(
            "frozen_parameters") else "")
        + f"), compute dtype {inert_text(arch['compute_dtype'])}.",
        f"- Load it: {_loader(card)}.",
        "",
        "## Objective",
        f"- {inert_text(card['objective']['method'])}; loss "
        f"{inert_text(card['objective']['loss'])}.",
        f"- Projector {inert_code(card['objective']['projector'])}, predictor "
        f"{inert_code(card['objective']['predictor'])}, target "
        f"{inert_code(card['objective']['target'])}.",
        "",
        "## Pre-training",
        f"- Steps {inert_text(training['steps'])}, epochs {inert_text(training['epochs'])}, "
        f"batch {inert_text(training['batch_size'])}, seed {inert_text(training['seed'])}.",
        f"- Data: {inert_code({k: v for k, v in data.items() if k != 'converter'})}.",
        f"- Augmentations: {inert_code(card['augmentations'])}.",
        "",
        "## Config changes during pre-training",
        *_history_rows(card.get("config_history", [])),
        "",
        "## Code",
        *_code_rows(card),
        "",
        "## Evaluations",
        *_evaluation_rows(card),
        "",
        f"The full pre-training config is in `{CARD_JSON}` under `pretrain_config`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(directory: epath.PathLike, card: dict[str, Any]) -> None:
    """Writes both card files into ``directory``: a new export's staging directory."""
    directory = epath.Path(directory)
    files.write_files({directory / CARD_JSON: json_files.dumps(card, indent=2, sort_keys=True),
                       directory / CARD_MARKDOWN: render_markdown(card)}, what="model card")


def read_model_card(directory: epath.PathLike) -> dict[str, Any]:
    """``model_card.json`` of an export (checked to be a card: :data:`schemas.MODEL_CARD`)."""
    return json_files.read(epath.Path(directory) / CARD_JSON, spec=schemas.MODEL_CARD,
                           what="model card", max_bytes=CARD_MAX_BYTES)


def read_results(directory: epath.PathLike) -> dict[str, Any]:
    """The ``results.json`` of an evaluation workdir; :class:`SourceError` naming the file when
    it is missing or not a result."""
    path = epath.Path(directory) / RESULTS_NAME
    try:
        return json_files.read(path, spec=schemas.RESULTS, what="evaluation result",
                               max_bytes=CARD_MAX_BYTES)
    except files.StorageError as error:
        raise SourceError(str(error)) from None
    except OSError as error:
        raise SourceError(f"{path} cannot be read as an evaluation result: {error}") from None


def add_results_to_card(export_dir: epath.PathLike, results: Sequence[str]) -> dict[str, Any]:
    """Adds the ``results.json`` of the evaluation workdirs ``results`` to the model card of the
    local export ``export_dir`` (the explicit command ``byol-add-results``); returns the card.

    Evaluation never writes into what it reads: recording a result in an export is this
    separate step. The export directory and both card files must be real (no symbolic links)."""
    directory = os.path.abspath(os.fspath(export_dir))
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise SourceError(f"{directory} is not an export directory"
                          + (" (a symbolic link: name the directory itself)"
                             if os.path.islink(directory) else ""))
    paths = {name: os.path.join(directory, name) for name in (CARD_JSON, CARD_MARKDOWN)}
    try:
        for path in paths.values():  # both checked before anything is read or written
            files.check_writable(path, what="model card file")
        card = read_model_card(directory)
        if "evaluations" not in card:
            raise files.StorageError(f"model card {paths[CARD_JSON]}: key 'evaluations' is "
                                     "missing")
        for workdir in results:
            card = add_evaluation(card, read_results(workdir))
        markdown = render_markdown(card)
    except SourceError:
        raise
    except files.StorageError as error:
        raise SourceError(str(error)) from None
    except OSError as error:
        raise SourceError(f"{paths[CARD_JSON]} cannot be read as a model card: {error}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise SourceError(f"{paths[CARD_JSON]} is not a model card this version renders (a "
                          f"section is missing or malformed: {error!r})") from None
    try:  # both files or neither
        files.write_files({paths[CARD_JSON]: json_files.dumps(card, indent=2, sort_keys=True),
                           paths[CARD_MARKDOWN]: markdown}, what="model card file")
    except files.StorageError as error:
        raise SourceError(str(error)) from None
    return card


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
    inputs = [workdir or source.removeprefix(RANDOM_PREFIX)]
    check_output_dir(out, "export", inputs=inputs)  # before anything is read
    pretrained = load_pretraining_encoder(workdir, step) if workdir else load_source(source)
    card = build_model_card(pretrained, intended_use=intended_use,
                            out_of_scope_use=out_of_scope_use, known_failures=known_failures)
    for directory in results:
        card = add_evaluation(card, read_results(directory))
    write_card = lambda staging: write_model_card(staging, card)
    if export_format == "torch":
        from byol_flax.export import torch_format  # imports safetensors, only when asked for
        card["export"] = {"format": "torch", "file": torch_format.WEIGHTS_NAME,
                          **torch_format.architecture(pretrained)}
        return torch_format.export_torch(pretrained, out, write_extra=write_card, inputs=inputs)
    return export_encoder(pretrained, out, write_extra=write_card, inputs=inputs)
