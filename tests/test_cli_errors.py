"""Every command turns a bad config, flag, file or path into one line.

A corpus of bad inputs for each console command (train, evaluate, export, import, demo, study,
launch and the three converters): each case must exit non-zero with at most 3 console lines and
no ``Traceback`` (the traceback goes to the log file, :mod:`byol_flax.runtime.commands`), and
must change nothing in its tree but its own output paths (a snapshot of paths, sizes, mtimes,
sha256 and link targets before and after).

A fresh process costs ~10 s here (JAX and TensorFlow imports), so the corpus runs in one helper
process (``python -m tests.test_cli_errors DIR``): it imports the libraries once, builds the
tree (the digits, a tiny export and damaged copies of it) in a forked child, then runs each case
in a forked child of its own, the command's module imported there (train, evaluate, export,
import and demo define their flags on absl's global flags on import, so each must be alone in its
process; the others keep theirs on their own ``COMMAND_FLAGS``), with a fresh ``sys.argv``, its
stdout and stderr in files, as the console script would run it. Every command's ``--help`` runs
the same way, to check that all of them answer it alike (absl's, through
``commands.run_command``). JAX never starts in the helper
itself, so forking it is safe (a child that hangs all the same is killed after CASE_TIMEOUT_S and
reported). Two cases run at a time; measured: the whole corpus in ~60 s on 2 cores.
"""

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 3
CASE_TIMEOUT_S = 120
LANES = 2  # cases run at a time (this machine has 2 cores)

# Console script -> (module, entry point), as pyproject.toml's [project.scripts].
COMMANDS = {
    "byol-train": ("byol_flax.main", "run"),
    "byol-evaluate": ("byol_flax.evaluation.__main__", "run"),
    "byol-export": ("byol_flax.export.__main__", "run"),
    "byol-import-official": ("byol_flax.export.import_official", "run"),
    "byol-demo": ("byol_flax.studies.demo", "run"),
    "byol-study": ("byol_flax.studies.runner", "main"),
    "byol-launch": ("byol_flax.cloud.launch", "main"),
    "byol-add-results": ("byol_flax.export.add_results", "run"),
    "byol-convert-digits": ("byol_flax.data.convert.digits", "main"),
    "byol-convert-images": ("byol_flax.data.convert.image_folder", "main"),
    "byol-convert-tfds": ("byol_flax.data.convert.tfds_to_arrayrecord", "main"),
}
# Imported once by the helper (the commands' heavy dependencies); none defines a global absl
# flag.
PRELOAD = ("byol_flax.train", "byol_flax.evaluation.runner", "byol_flax.export.model_card",
           "byol_flax.weights.official", "byol_flax.export.torch_format",
           "byol_flax.studies.runner", "byol_flax.studies.report", "byol_flax.cloud.launch",
           "byol_flax.data.convert.digits", "byol_flax.data.convert.image_folder",
           "byol_flax.data.convert.tfds_to_arrayrecord")


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad invocation. ``{T}`` in ``args`` and ``names`` is the tree. ``names``: what the
    error line must name (the key, file or value); ``outputs``: the paths (relative to the
    tree) the command may create or change: a new path under ``out/`` when it names one, none
    when its output is a user's file or folder (refused untouched); ``env``: extra environment
    variables; ``bug``: a genuine error of code, which keeps its traceback."""

    id: str
    command: str
    args: tuple[str, ...]
    names: str = ""
    outputs: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    bug: bool = False


def _output(case_id: str, existing: str | None) -> tuple[str, tuple[str, ...]]:
    """(the output path, the outputs it may change): a new ``out/<case>``, or an ``existing``
    user's path that must stay as it is."""
    return (existing, ()) if existing else (f"out/{case_id}", (f"out/{case_id}",))


def _train(case_id: str, *args: str, names: str, config: str = "digits_cpu:{T}/data,smoke=True",
           workdir: str | None = None, bug: bool = False) -> Case:
    workdir, outputs = _output(case_id, workdir)
    return Case(case_id, "byol-train", (f"--config={config}", *args, f"--workdir={{T}}/{workdir}"),
                names, outputs, bug=bug)


def _init_from(case_id: str, export: str, names: str) -> Case:
    return _train(case_id, f"--config.model.init_from={{T}}/{export}", names=names)


def _evaluate(case_id: str, source: str, *args: str, names: str,
              config: str = "eval_digits:linear,data={T}/data,smoke=True",
              workdir: str | None = None) -> Case:
    workdir, outputs = _output(case_id, workdir)
    return Case(case_id, "byol-evaluate", (f"--config={config}", f"--source={source}", *args,
                                           f"--workdir={{T}}/{workdir}"), names, outputs)


def _export(case_id: str, *args: str, names: str, out: str | None = None) -> Case:
    out, outputs = _output(case_id, out)
    return Case(case_id, "byol-export", (*args, f"--out={{T}}/{out}"), names, outputs)


def _import(case_id: str, checkpoint: str, names: str, out: str | None = None) -> Case:
    out, outputs = _output(case_id, out)
    return Case(case_id, "byol-import-official",
                (f"--checkpoint={checkpoint}", f"--out={{T}}/{out}"), names, outputs)


def _demo(case_id: str, *args: str, names: str, workdir: str | None = None) -> Case:
    workdir, outputs = _output(case_id, workdir)
    return Case(case_id, "byol-demo", (f"--workdir={{T}}/{workdir}", *args), names, outputs)


def _study(case_id: str, *args: str, names: str, workdir: str | None = None) -> Case:
    workdir, outputs = _output(case_id, workdir)
    return Case(case_id, "byol-study", (*args, f"--workdir={{T}}/{workdir}"), names, outputs)


def _add_results(case_id: str, export: str, results: str, names: str) -> Case:
    """Adds ``results`` to ``export``'s card: both are the tree's, so nothing may change."""
    return Case(case_id, "byol-add-results", (f"--export={export}", f"--results={results}"),
                names)


def _launch(case_id: str, *args: str, names: str, **env: str) -> Case:
    return Case(case_id, "byol-launch", args, names, env=tuple(env.items()))


def _convert(command: str, case_id: str, *args: str, names: str,
             out: str | None = None) -> Case:
    out, outputs = _output(case_id, out)
    return Case(case_id, command, (*args, "--out", f"{{T}}/{out}", "--no-progress"), names,
                outputs)


_SLICE = ("--config=digits_cpu", "--workdir=gs://bucket/run", "--repo=https://example.com/r.git",
          "--commit=0123abc")
# Damaged copies of the tiny export (see _damage): what --source and model.init_from read, and
# what their error names.
DAMAGED = {"bad_json": "export_bad_json/encoder_config.json",
           "link_json": "export_link_json/encoder_config.json",
           "unknown_encoder": "resnet_nonexistent", "wide": "1000",
           "truncated": "export_truncated/encoder",
           "deep_json": "export_deep_json/encoder_config.json",
           "fifo_json": "export_fifo_json/encoder_config.json"}
IMAGES, DIGITS, TFDS = "byol-convert-images", "byol-convert-digits", "byol-convert-tfds"

CASES = [
    # --- byol-train: flags and config ------------------------------------------------------
    _train("train_typo_key", "--config.training.batch_szie=8", names="training.batch_szie"),
    _train("train_typo_section", "--config.trainig.batch_size=8", names="trainig"),
    _train("train_wrong_type_int", "--config.training.batch_size=large", names="large"),
    _train("train_wrong_type_float", "--config.training.epochs=8.x", names="8.x"),
    _train("train_wrong_type_section", "--config.model=3", names="--config.model=3"),
    _train("train_unreadable_key_path", "--config.training..epochs=1", names="training..epochs"),
    _train("train_missing_config_file", config="{T}/missing.py", names="{T}/missing.py"),
    _train("train_config_file_is_a_directory", config="{T}/config_dir.py",
           names="{T}/config_dir.py"),
    _train("train_unknown_config_name", config="digits_gpu", names="digits_gpu"),
    _train("train_config_argument_typo", config="digits_cpu:{T}/data,smok=True", names="smok"),
    _train("train_config_argument_type", config="digits_cpu:{T}/data,smoke=maybe",
           names="maybe"),
    _train("train_config_argument_choice", config="digits_cpu:{T}/data,augment=strong",
           names="strong"),
    _train("train_imagenet_encoder_argument", config="byol_imagenet:resnet50", names="resnet50"),
    _train("train_imagenet_unknown_slice", config="byol_imagenet:r50x1,slice=v9-8",
           names="v9-8"),
    _train("train_unknown_flag", "--wrkdir=x", names="wrkdir"),
    _train("train_unexpected_argument", "extra", names="extra"),
    Case("train_missing_workdir_flag", "byol-train", ("--config=digits_cpu",), "--workdir"),
    _train("train_invalid_value", "--config.optimizer.base_learning_rate=-0.1",
           names="optimizer.base_learning_rate"),
    _train("train_missing_data", config="digits_cpu:{T}/no_data,smoke=True",
           names="{T}/no_data"),
    _train("train_workdir_is_a_file", workdir="notes.txt", names="{T}/notes.txt"),
    _train("train_workdir_under_a_file", workdir="notes.txt/run", names="{T}/notes.txt"),
    _train("train_workdir_is_a_users_folder", workdir="users_folder", names="{T}/users_folder"),
    # --- byol-train: model.init_from at a missing, foreign or damaged export ------------------
    _init_from("init_from_missing", "nothing", names="{T}/nothing"),
    _init_from("init_from_a_file", "notes.txt", names="{T}/notes.txt"),
    *(_init_from(f"init_from_{damage}", f"export_{damage}", names=names)
      for damage, names in DAMAGED.items()),
    # --- byol-evaluate ------------------------------------------------------------------------
    _evaluate("evaluate_typo_key", "{T}/export", "--config.linaer.epochs=1", names="linaer"),
    _evaluate("evaluate_config_argument", "{T}/export", config="eval_digits:linaer",
              names="linaer"),
    _evaluate("evaluate_missing_config_file", "{T}/export", config="{T}/eval_missing.py",
              names="{T}/eval_missing.py"),
    _evaluate("evaluate_source_missing", "{T}/nothing", names="{T}/nothing"),
    _evaluate("evaluate_source_is_a_file", "{T}/notes.txt", names="{T}/notes.txt"),
    _evaluate("evaluate_random_source_missing", "random:{T}/nothing", names="{T}/nothing"),
    *(_evaluate(f"evaluate_source_{damage}", f"{{T}}/export_{damage}", names=names)
      for damage, names in DAMAGED.items()),
    _evaluate("evaluate_workdir_is_a_file", "{T}/export", workdir="notes.txt",
              names="{T}/notes.txt"),
    _evaluate("evaluate_workdir_inside_the_export", "{T}/export", workdir="export/eval",
              names="{T}/export"),
    # --- byol-export --------------------------------------------------------------------------
    _export("export_source_missing", "--source={T}/nothing", names="{T}/nothing"),
    _export("export_workdir_without_checkpoints", "--workdir={T}/users_folder",
            names="{T}/users_folder"),
    _export("export_both_workdir_and_source", "--workdir={T}/export", "--source={T}/export",
            names="workdir"),
    _export("export_source_bad_json", "--source={T}/export_bad_json",
            names=DAMAGED["bad_json"]),
    _export("export_torch_source_truncated", "--source={T}/export_truncated", "--format=torch",
            names=DAMAGED["truncated"]),
    _export("export_torch_source_unknown_encoder", "--source={T}/export_unknown_encoder",
            "--format=torch", names=DAMAGED["unknown_encoder"]),
    _export("export_out_is_a_file", "--source={T}/export", out="notes.txt",
            names="{T}/notes.txt"),
    _export("export_out_under_a_file", "--source={T}/export", out="notes.txt/export",
            names="{T}/notes.txt"),
    _export("export_out_is_a_users_folder", "--source={T}/export", out="users_folder",
            names="{T}/users_folder"),
    _export("export_bad_format", "--source={T}/export", "--format=onnx", names="onnx"),
    # --- byol-import-official -----------------------------------------------------------------
    _import("import_not_a_pickle", "{T}/notes.txt", names="{T}/notes.txt"),
    _import("import_a_directory", "{T}/users_folder", names="{T}/users_folder"),
    _import("import_missing", "{T}/nothing.pkl", names="{T}/nothing.pkl"),
    _import("import_out_is_a_users_folder", "{T}/notes.txt", out="users_folder",
            names="{T}/users_folder"),  # refused before the file is read
    Case("import_missing_flags", "byol-import-official", ("--checkpoint={T}/nothing.pkl",),
         "--out"),
    # --- byol-demo ----------------------------------------------------------------------------
    _demo("demo_workdir_is_a_file", "--smoke", workdir="notes.txt", names="{T}/notes.txt"),
    _demo("demo_workdir_under_a_file", "--smoke", workdir="notes.txt/demo",
          names="{T}/notes.txt"),
    _demo("demo_unknown_recipe", "--recipes=tiny", names="tiny"),
    _demo("demo_seeds_not_integers", "--seeds=a", names="--seeds=a"),
    # --- byol-study ---------------------------------------------------------------------------
    _study("study_unknown", "--study=nosuch", "--print", names="nosuch"),
    _study("study_missing_module_file", "--study={T}/missing_study.py", "--print",
           names="{T}/missing_study.py"),
    _study("study_unknown_row", "--study=cpu_collapse", "--rows=nosuch", "--print",
           names="nosuch"),
    _study("study_unknown_override_key", "--study=cpu_collapse", "--set=training.batch_szie=8",
           "--print", names="batch_szie"),
    _study("study_override_not_key_value", "--study=cpu_collapse", "--set=novalue", "--print",
           names="novalue"),
    _study("study_seeds_not_integers", "--study=cpu_collapse", "--seeds=a", "--print",
           names="--seeds=a"),
    _study("study_workdir_is_a_file", "--study=cpu_collapse", "--smoke", workdir="notes.txt",
           names="{T}/notes.txt"),
    Case("study_missing_workdir", "byol-study", ("--study=cpu_collapse",), "--workdir"),
    _study("study_unknown_flag", "--study=cpu_collapse", "--print", "--smoek", names="smoek"),
    # --- byol-launch --------------------------------------------------------------------------
    _launch("launch_unknown_action", "explode", "--accelerator=v4-8", *_SLICE, names="explode"),
    _launch("launch_unknown_accelerator", "skypilot", "--accelerator=v9-8", *_SLICE,
            names="v9-8"),
    _launch("launch_missing_repo", "skypilot", "--accelerator=v4-8", "--config=digits_cpu",
            "--workdir=gs://bucket/run", names="--repo"),
    _launch("launch_missing_engine", "--accelerator=v4-8", *_SLICE, names="one engine"),
    _launch("launch_flag_of_the_other_engine", "skypilot", "--accelerator=v4-8", "--cluster=k",
            *_SLICE, names="--cluster"),
    # --- converters ---------------------------------------------------------------------------
    _convert(DIGITS, "digits_out_is_a_file", out="notes.txt", names="{T}/notes.txt"),
    _convert(DIGITS, "digits_out_under_a_file", out="notes.txt/digits", names="{T}/notes.txt"),
    _convert(DIGITS, "digits_out_is_a_users_folder", out="users_folder",
             names="{T}/users_folder"),
    _convert(DIGITS, "digits_holdout_not_positive", "--holdout-count", "0",
             names="--holdout-count"),
    _convert(DIGITS, "digits_unknown_flag", "--bogus", names="bogus"),
    _convert(DIGITS, "digits_unexpected_argument", "extra", names="extra"),
    _convert(DIGITS, "digits_exclusive_flags", "--holdout-count", "5", "--holdout-fraction",
             "0.1", names="--holdout-fraction"),
    _convert(IMAGES, "images_src_missing", "--src", "{T}/nothing", names="{T}/nothing"),
    _convert(IMAGES, "images_src_is_a_file", "--src", "{T}/notes.txt", names="{T}/notes.txt"),
    _convert(IMAGES, "images_src_without_images", "--src", "{T}/no_images",
             names="{T}/no_images"),
    _convert(IMAGES, "images_out_is_a_file", "--src", "{T}/images", out="notes.txt",
             names="{T}/notes.txt"),
    _convert(IMAGES, "images_out_under_a_file", "--src", "{T}/images", out="notes.txt/images",
             names="{T}/notes.txt"),
    _convert(IMAGES, "images_out_inside_the_source", "--src", "{T}/images", out="images/out",
             names="{T}/images"),
    _convert(TFDS, "tfds_missing_name", names="--name"),
    _convert(TFDS, "tfds_out_is_a_file", "--name", "cifar10", "--data-dir", "{T}/nothing",
             out="notes.txt", names="notes.txt"),
    # --- hostile files where the commands read and write (byol_flax.storage) ---------------
    # Links, FIFOs, devices, deep or mistyped JSON, undecodable text: each refused in one line
    # by the storage layer, never followed, never blocking, nothing written through them.
    _train("train_log_is_a_link", names="log.txt", workdir="wd_log_link"),
    # (The run gets as far as its log file and history: the link's target must stay as it is.)
    Case("train_config_json_is_a_link", "byol-train",
         ("--config=digits_cpu:{T}/data,smoke=True", "--workdir={T}/wd_config_link"),
         "config.json", ("wd_config_link",)),
    *(Case(f"train_lease_is_{name}", "byol-train",
           ("--config=digits_cpu:{T}/data,smoke=True", f"--workdir={{T}}/wd_lease_{name}"),
           "lease.json", (f"wd_lease_{name}/log.txt",)) for name in ("fifo", "zero")),
    _train("train_manifest_is_a_list", config="digits_cpu:{T}/data_list_manifest,smoke=True",
           names="data_list_manifest/manifest.json"),
    _train("train_manifest_is_a_fifo", config="digits_cpu:{T}/data_fifo_manifest,smoke=True",
           names="data_fifo_manifest/manifest.json"),
    _train("train_output_marker_is_a_fifo", names="wd_marker_fifo", workdir="wd_marker_fifo"),
    Case("evaluate_config_json_is_a_link", "byol-evaluate",
         ("--config=eval_digits:linear,data={T}/data,smoke=True", "--source={T}/export",
          "--workdir={T}/eval_config_link"), "config.json"),
    _add_results("add_results_card_markdown_is_a_directory", "{T}/export_md_dir",
                 "{T}/results_ok", names="MODEL_CARD.md"),
    _add_results("add_results_results_is_a_fifo", "{T}/export_card", "{T}/results_fifo",
                 names="results_fifo/results.json"),
    _add_results("add_results_results_nested_deep", "{T}/export_card", "{T}/results_deep",
                 names="results_deep/results.json"),
    _add_results("add_results_card_is_a_list", "{T}/export_card_list", "{T}/results_ok",
                 names="export_card_list/model_card.json"),
    _add_results("add_results_card_is_a_link", "{T}/export_card_link", "{T}/results_ok",
                 names="model_card.json"),
    _convert(IMAGES, "images_val_labels_not_utf8", "--src", "{T}/imagenet_tree", "--layout",
             "imagenet", "--val-labels", "{T}/val_labels_latin1.txt",
             names="val_labels_latin1.txt"),
    _launch("launch_override_with_a_newline", "skypilot", "--accelerator=v4-8", *_SLICE,
            "--override=--config.seed=1\nimage: attacker/image", names="--override"),
    # --- genuine errors of code (a config module with a bug) keep their traceback -------------
    _train("bug_in_get_config_key_error", config="{T}/buggy_key.py", names="KeyError",
           bug=True),
    _train("bug_in_get_config_type_error", config="{T}/buggy_type.py", names="TypeError",
           bug=True),
]


# Every command's --help: the command's docstring, then its own flags (not absl's), status 1.
HELP_CASES = [Case(f"help_{command}", command, ("--help",)) for command in COMMANDS]


# ---------------------------------------------------------------------------------------------
# The tree and its snapshot


def snapshot(root: Path) -> dict[str, list]:
    """Every path under ``root``: a file's size, mtime, mode and sha256, a link's target, a
    directory's mode (not its mtime: a command may create and remove a temporary entry)."""
    found: dict[str, list] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            key = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                found[key] = ["link", os.readlink(path)]
            elif stat.S_ISDIR(info.st_mode):
                found[key] = ["dir", stat.S_IMODE(info.st_mode)]
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as file:
                    digest = hashlib.sha256(file.read()).hexdigest()
                found[key] = ["file", info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode),
                              digest]
            else:
                found[key] = ["other", info.st_mode]
    return found


def changed_outside(before: dict, after: dict, outputs: tuple[str, ...]) -> list[str]:
    """Paths that appeared, vanished or changed, except the case's outputs and their
    contents."""
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [k for k in changed
            if not any(k == out or k.startswith(out.rstrip("/") + "/") for out in outputs)]


def _build_user_files(tree: Path) -> None:
    """Files of a user's project around the inputs: commands must leave them alone."""
    from PIL import Image  # noqa: PLC0415

    (tree / "notes.txt").write_text("a user's notes\n")
    (tree / "users_folder").mkdir()
    (tree / "users_folder" / "thesis.tex").write_text("\\chapter{mine}\n")
    (tree / "config_dir.py").mkdir()
    (tree / "buggy_key.py").write_text("def get_config(arg=None):\n    return {}['model']\n")
    (tree / "buggy_type.py").write_text("def get_config(arg=None):\n    return len(3)\n")
    (tree / "empty").mkdir()
    (tree / "no_images" / "cat").mkdir(parents=True)
    (tree / "no_images" / "cat" / "readme.txt").write_text("no pictures here\n")
    for label in ("cat", "dog"):
        (tree / "images" / label).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (6, 6), (40 * index, 80, 120)).save(
                tree / "images" / label / f"{index}.png")
    (tree / "out").mkdir()
    _plant_hostile_files(tree)


def _mark(directory: Path, kind: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".byol_flax_output.json").write_text(json.dumps({"kind": kind}))
    return directory


def _plant_hostile_files(tree: Path) -> None:
    """Earlier outputs of the commands with links, FIFOs and devices planted in them, and
    malformed inputs (the storage layer's cases)."""
    (_mark(tree / "wd_log_link", "pretraining") / "log.txt").symlink_to(tree / "notes.txt")
    (_mark(tree / "wd_config_link", "pretraining") / "config.json").symlink_to(
        tree / "notes.txt")
    os.mkfifo(_mark(tree / "wd_lease_fifo", "pretraining") / "lease.json")
    (_mark(tree / "wd_lease_zero", "pretraining") / "lease.json").symlink_to("/dev/zero")
    (tree / "wd_marker_fifo").mkdir()
    os.mkfifo(tree / "wd_marker_fifo" / ".byol_flax_output.json")
    (_mark(tree / "eval_config_link", "evaluation") / "config.json").symlink_to(
        tree / "notes.txt")
    (tree / "data_list_manifest").mkdir()
    (tree / "data_list_manifest" / "manifest.json").write_text("[]")
    (tree / "data_fifo_manifest").mkdir()
    os.mkfifo(tree / "data_fifo_manifest" / "manifest.json")
    (tree / "results_ok").mkdir()
    (tree / "results_ok" / "results.json").write_text(json.dumps(
        {"protocol": "linear", "test": {"top1": 0.5}}))
    (tree / "results_fifo").mkdir()
    os.mkfifo(tree / "results_fifo" / "results.json")
    (tree / "results_deep").mkdir()
    (tree / "results_deep" / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    (tree / "val_labels_latin1.txt").write_bytes("0.png caf\xe9\n".encode("latin-1"))
    for label in ("cat", "dog"):
        (tree / "imagenet_tree" / "train" / label).mkdir(parents=True)
        shutil.copy(tree / "images" / label / "0.png", tree / "imagenet_tree" / "train" / label)
    (tree / "imagenet_tree" / "val").mkdir()
    shutil.copy(tree / "images" / "cat" / "0.png", tree / "imagenet_tree" / "val")


def _build_data_and_export(tree: Path) -> None:
    """The digits and a tiny export of digits_cpu's smoke model (runs in a forked child: JAX
    starts here)."""
    from byol_flax.configs import digits_cpu  # noqa: PLC0415
    from byol_flax.data.convert import digits  # noqa: PLC0415
    from byol_flax.export import encoder as export  # noqa: PLC0415
    from byol_flax.weights import encoder as weights  # noqa: PLC0415

    assert digits.main(["--out", str(tree / "data"), "--holdout-count", "150",
                        "--no-progress"]) == 0
    model = json.loads(digits_cpu.get_config(f"{tree / 'data'},smoke=True").model.to_json())
    pretrained = weights.PretrainedEncoder(weights.encoder_from_model_config(model, seed=1), model,
                                          {"kind": "test", "step": 1})
    export.export_encoder(pretrained, tree / "export")
    from byol_flax.export import model_card  # noqa: PLC0415

    model_card.export_with_model_card(None, str(tree / "export_card"), source=str(tree / "export"))


def _damage(tree: Path) -> None:
    """Copies of the export, each damaged one way (DAMAGED)."""
    source = tree / "export"
    for name in DAMAGED:
        shutil.copytree(source, tree / f"export_{name}", symlinks=True)
    (tree / "export_bad_json" / "encoder_config.json").write_text('{"format_version": 2, "mod')
    link = tree / "export_link_json" / "encoder_config.json"
    link.unlink()
    link.symlink_to(tree / "notes.txt")
    for name, key, value in (("unknown_encoder", "name", "resnet_nonexistent"),
                             ("wide", "width_multiplier", 1000)):
        path = tree / f"export_{name}" / "encoder_config.json"
        meta = json.loads(path.read_text())
        meta["model"]["encoder"][key] = value
        path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    (tree / "export_deep_json" / "encoder_config.json").write_text("{\"model\": "
                                                                    + "[" * 100_000)
    (tree / "export_fifo_json" / "encoder_config.json").unlink()
    os.mkfifo(tree / "export_fifo_json" / "encoder_config.json")
    for name in ("md_dir", "card_list", "card_link"):
        shutil.copytree(tree / "export_card", tree / f"export_{name}", symlinks=True)
    (tree / "export_md_dir" / "MODEL_CARD.md").unlink()
    (tree / "export_md_dir" / "MODEL_CARD.md").mkdir()
    (tree / "export_card_list" / "model_card.json").write_text("[]")
    (tree / "export_card_link" / "model_card.json").unlink()
    (tree / "export_card_link" / "model_card.json").symlink_to(tree / "notes.txt")
    arrays = [p for p in (tree / "export_truncated" / "encoder").rglob("*") if p.is_file()]
    largest = max(arrays, key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as file:
        file.truncate(largest.stat().st_size // 2)


# ---------------------------------------------------------------------------------------------
# The helper process


def _exit_status(code: object) -> int:
    """What ``sys.exit(code)`` makes the process status (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_child(case: Case, tree: Path, out: Path, err: Path) -> None:
    """The forked child: the console script of ``case.command``, as a shell would start it."""
    status = 1
    try:
        os.chdir(tree)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            os.dup2(os.open(path, flags, 0o644), fd)
        for key, value in case.env:
            os.environ[key] = value.replace("{T}", str(tree))
        module, entry = COMMANDS[case.command]
        sys.argv = [case.command, *(a.replace("{T}", str(tree)) for a in case.args)]
        sys.exit(getattr(importlib.import_module(module), entry)())
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    except BaseException:  # noqa: BLE001 - Python's own report of an uncaught exception
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _fork(target, *args) -> int:
    """Starts ``target(*args)`` in a forked child (which ends with ``os._exit``); its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        finally:
            os._exit(1)
    return pid


def _wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _build_in_child(tree: Path) -> None:
    try:
        _build_data_and_export(tree)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


@dataclasses.dataclass
class _Running:
    case: Case
    started: float
    before: dict
    alongside: set[str]  # cases that ran at the same time: their outputs may change too


def _run_cases(cases: list[Case], tree: Path, console_dir: Path) -> dict[str, dict]:
    """Every case in a forked child, LANES at a time. A case's snapshots are taken when it
    starts and ends; changes to the outputs of cases running alongside are theirs."""
    by_id = {case.id: case for case in cases}
    queue, running, results = list(cases), {}, {}
    while queue or running:
        while queue and len(running) < LANES:
            case = queue.pop(0)
            before = snapshot(tree)
            pid = _fork(_run_child, case, tree, console_dir / f"{case.id}.out",
                        console_dir / f"{case.id}.err")
            for other in running.values():
                other.alongside.add(case.id)
            running[pid] = _Running(case, time.perf_counter(), before,
                                    {other.case.id for other in running.values()})
        pid, status = os.waitpid(-1, os.WNOHANG)
        now = time.perf_counter()
        if not pid:
            for pid, run in running.items():
                if now - run.started > CASE_TIMEOUT_S:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
            continue
        run = running.pop(pid)
        timed_out = now - run.started > CASE_TIMEOUT_S
        allowed = run.case.outputs + tuple(o for c in run.alongside for o in by_id[c].outputs)
        results[run.case.id] = {
            "status": None if timed_out else os.waitstatus_to_exitcode(status),
            "seconds": round(now - run.started, 2), "alongside": sorted(run.alongside),
            "stdout": (console_dir / f"{run.case.id}.out").read_text(errors="replace"),
            "stderr": (console_dir / f"{run.case.id}.err").read_text(errors="replace"),
            "changed": changed_outside(run.before, snapshot(tree), allowed)}
    return results


def serve(base: Path) -> None:
    """Builds ``base/tree`` and runs every case of CASES there; writes ``base/results.json``."""
    started = time.perf_counter()
    tempfile.tempdir = str(base / "tmp")  # the commands' temporary log files: outside the tree
    os.makedirs(tempfile.tempdir, exist_ok=True)
    tree = base / "tree"
    tree.mkdir()
    _build_user_files(tree)
    builder = _fork(_build_in_child, tree)  # while this process imports the rest
    for module in PRELOAD:
        importlib.import_module(module)
    imported = time.perf_counter() - started
    assert _wait(builder) == 0, "building the tree failed (its traceback is above)"
    _damage(tree)
    built = time.perf_counter() - started
    (base / "console").mkdir()
    results = _run_cases(CASES + HELP_CASES, tree, base / "console")
    (base / "results.json").write_text(json.dumps({
        "cases": results, "tree": str(tree), "import_seconds": round(imported, 1),
        "tree_seconds": round(built, 1),
        "total_seconds": round(time.perf_counter() - started, 1)}, indent=1))


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Runs the corpus in the helper process; its results by case."""
    base = tmp_path_factory.mktemp("cli_errors")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tests.test_cli_errors", str(base)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((base / "results.json").read_text())
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"\ncorpus: {len(CASES)} cases in {results['wall_seconds']} s (imports "
          f"{results['import_seconds']} s, tree ready at {results['tree_seconds']} s)")
    return results


def test_the_snapshot_sees_content_mtime_and_link_changes_outside_the_outputs(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "link").symlink_to("kept.txt")
    before = snapshot(tmp_path)
    (tmp_path / "out" / "new").write_text("mine")
    assert changed_outside(before, snapshot(tmp_path), ("out",)) == []
    os.utime(tmp_path / "kept.txt", ns=(0, 0))
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to("out")
    assert changed_outside(before, snapshot(tmp_path), ("out",)) == ["kept.txt", "link"]


def test_the_corpus_covers_every_command():
    assert {case.command for case in CASES} == set(COMMANDS)
    assert len({case.id for case in CASES + HELP_CASES}) == len(CASES + HELP_CASES)


@pytest.mark.parametrize("case", HELP_CASES, ids=lambda case: case.id)
def test_every_command_answers_help_alike(corpus, case):
    """absl's --help for all (byol_flax.runtime.commands.run_command): the docstring, a blank
    line, ``flags:``, the command's own flags under its program name, absl's pointer to
    --helpfull; on stdout, status 1 (absl's), nothing else."""
    result, _, shown = _console(corpus, case)
    assert result["status"] == 1 and not result["stderr"].strip(), shown
    doc, sep, own = result["stdout"].partition(f"\nflags:\n\n{case.command}:\n")
    assert sep and doc.strip() and "Traceback" not in result["stdout"], shown
    assert own.lstrip().startswith("--"), shown
    own, _, tail = own.partition("\n\nTry --helpfull to get a list of all flags.")
    assert _ and not tail.strip(), shown
    assert "--flagfile" not in own and "--verbosity" not in own, shown  # absl's: --helpfull
    assert any(f"--{flag}" in own for flag in ("workdir", "out", "checkpoint", "export")), shown


def _console(corpus: dict, case: Case) -> tuple[dict, list[str], str]:
    """The case's result, its non-empty console lines and a report of it for a failure."""
    result = corpus["cases"][case.id]
    console = result["stdout"] + result["stderr"]
    lines = [line for line in console.splitlines() if line.strip()]
    shown = f"{case.command} {' '.join(case.args)}\n--- console ---\n{console[-3000:]}"
    return result, lines, shown


@pytest.mark.parametrize("case", [c for c in CASES if not c.bug], ids=lambda case: case.id)
def test_a_bad_input_is_one_line_naming_it_and_changes_nothing_else(corpus, case):
    result, lines, shown = _console(corpus, case)
    assert result["status"] is not None, f"timed out after {CASE_TIMEOUT_S} s: {shown}"
    assert result["status"] != 0, shown
    assert not any("Traceback" in line for line in lines), shown
    assert len(lines) <= MAX_LINES, shown
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) >= 1, shown
    assert case.names.replace("{T}", corpus["tree"]) in errors[-1], shown
    assert not result["changed"], (f"changed outside {case.outputs} (cases alongside: "
                                   f"{result['alongside']}): {result['changed']}\n{shown}")


@pytest.mark.parametrize("case", [c for c in CASES if c.bug], ids=lambda case: case.id)
def test_a_bug_keeps_its_traceback(corpus, case):
    result, lines, shown = _console(corpus, case)
    assert result["status"] not in (None, 0), shown
    assert any("Traceback" in line for line in lines), shown
    assert any(case.names in line for line in lines), shown


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
