"""byol_flax/data/convert/: the converters write what byol_flax.data.records reads, resumably and
reproducibly.

Trees are a few tiny JPEG and PNG files made with Pillow; the records are read back with
ArrayRecord and compared with the source files byte for byte.
"""

import concurrent.futures
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import types
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from byol_flax.data import augment, imagenet, records, staging
from byol_flax.data.convert import (
    digits,
    image_folder,
    image_io,
    order,
    tfds_to_arrayrecord,
    writer,
)
from byol_flax.data.records import (
    UNLABELED,
    decode_record,
    file_sha256,
    load_manifest,
    split_evenly,
    verify_shard,
    verify_split,
)
from byol_flax.runtime.outputs import MARKER_NAME
from byol_flax.storage import files as storage_files
from byol_flax.storage import staging as file_staging

CLASSES = {"cat": 3, "dog": 4, "eel": 3}
EXTENSIONS = (".jpg", ".png", ".JPEG", ".PNG")
SUMMARY = re.compile(r"(\d+) shards written, (\d+) skipped")
REPO = Path(__file__).resolve().parents[1]


def write_image(path, rng, size=(5, 6)):
    """A tiny random image in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_class_tree(root, classes=CLASSES, seed=0):
    """Class folders of mixed JPEG/PNG files (one in a sub-folder) plus files to be ignored."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        for i in range(count):
            sub = "nested/" if i == 3 else ""
            write_image(root / name / f"{sub}{name}_{i}{EXTENSIONS[i % 4]}", rng)
        (root / name / "notes.txt").write_text("not an image")
        (root / name / ".hidden.jpg").write_bytes(b"macOS resource fork, not an image")
    return root


def image_files(root):
    return sorted(p for p in root.rglob("*") if image_io.is_image_file(p.name))


def run(module, *args, workers=1):
    argv = [str(a) for a in args] + ["--workers", str(workers), "--no-progress"]
    return module.main(argv)


def summary_counts(capsys):
    """(written, skipped) from the summary line of the last run."""
    return tuple(int(n) for n in SUMMARY.search(capsys.readouterr().out).groups())


def read_split(out_dir, split):
    """Every record of a split, after checking each shard against the manifest."""
    manifest = load_manifest(out_dir)
    records = []
    for shard in manifest.splits[split].shards:
        path = epath.Path(out_dir) / shard.file
        verify_shard(path, shard)
        assert file_sha256(path) == shard.sha256
        reader = array_record_module.ArrayRecordReader(str(path))
        records.extend(decode_record(data) for data in reader.read_all())
        reader.close()
    return records


def shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.array_record"))}


def class_of(example_id):
    """The class folder of an id: the innermost folder that is not the "nested" sub-folder."""
    return [part for part in example_id.split("/")[:-1] if part != "nested"][-1]


def check_round_trip(out_dir, src, split, expected_files, label_names):
    """The split holds exactly ``expected_files``, bytes as found, with labels from their class."""
    manifest = load_manifest(out_dir)
    verify_split(out_dir, manifest, split)
    records = read_split(out_dir, split)
    assert sorted(r.id for r in records) == sorted(p.relative_to(src).as_posix()
                                                   for p in expected_files)
    assert manifest.splits[split].num_records == len(records)
    for record in records:
        assert record.image == (src / record.id).read_bytes()
        expected = label_names.index(class_of(record.id)) if label_names else UNLABELED
        assert record.label == expected, record.id
    return records


# ---------------------------------------------------------------------------------------------
# Layouts


def test_folders_round_trip(tmp_path):
    src = make_class_tree(tmp_path / "pets")
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--examples-per-shard", 3) == 0
    manifest = load_manifest(out)
    assert manifest.dataset == "pets"
    assert manifest.label_names == ("cat", "dog", "eel")
    assert list(manifest.splits) == ["train"]
    files = image_files(src)
    assert len(files) == sum(CLASSES.values())  # the .txt and the dot-file are skipped
    check_round_trip(out, src, "train", files, list(manifest.label_names))
    # 10 images, 3 per shard -> 4 shards, assigned by split_evenly.
    sizes = [s.num_records for s in manifest.splits["train"].shards]
    assert sizes == [len(part) for part in split_evenly(range(10), 4)]
    assert manifest.source["converter"] == "byol_flax.data.convert.image_folder"
    assert manifest.source["root"] == str(src.resolve())
    assert manifest.source["options"]["layout"] == "folders"
    assert manifest.source["reencode"] == "none"


def test_folders_with_split_subfolders(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train")
    make_class_tree(src / "val", {"cat": 1, "eel": 2}, seed=1)
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--holdout-count", 2) == 0
    manifest = load_manifest(out)
    assert sorted(manifest.splits) == ["holdout", "train", "validation"]
    assert manifest.label_names == ("cat", "dog", "eel")  # of train, shared by validation
    check_round_trip(out, src, "validation", image_files(src / "val"), ["cat", "dog", "eel"])
    train = {r.id for r in read_split(out, "train")}
    holdout = {r.id for r in read_split(out, "holdout")}
    assert len(holdout) == 2 and not train & holdout
    assert train | holdout == {p.relative_to(src).as_posix() for p in image_files(src / "train")}


def test_split_subfolder_with_unknown_class_fails(tmp_path, capsys):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 2})
    make_class_tree(src / "test", {"cow": 1})
    assert run(image_folder, "--src", src, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "cow" in error and str(src / "test") in error


def test_unlabeled_round_trip(tmp_path):
    src = make_class_tree(tmp_path / "raw")
    write_image(src / "top.png", np.random.default_rng(5))
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--layout", "unlabeled") == 0
    manifest = load_manifest(out)
    assert manifest.label_names == ()
    records = check_round_trip(out, src, "train", image_files(src), [])
    assert {r.label for r in records} == {UNLABELED}


def make_imagenet(root, *, val_folders=False):
    rng = np.random.default_rng(3)
    synsets = ["n01440764", "n01443537", "n01484850"]
    for synset in synsets:
        for i in range(3):
            write_image(root / "train" / synset / f"{synset}_{i}.JPEG", rng)
    val_labels = {f"ILSVRC2012_val_{i:08d}.JPEG": synsets[i % 3] for i in range(1, 5)}
    for name, synset in val_labels.items():
        write_image(root / "val" / (f"{synset}/" if val_folders else "") / name, rng)
    return synsets, val_labels


@pytest.mark.parametrize("label_format", ["names", "indices_and_stems", "kaggle_csv"])
def test_imagenet_flat_val_with_label_file(tmp_path, label_format):
    src = tmp_path / "imagenet"
    synsets, val_labels = make_imagenet(src)
    labels_file = tmp_path / "labels.txt"
    if label_format == "names":
        lines = [f"{name} {synset}" for name, synset in val_labels.items()]
    elif label_format == "indices_and_stems":
        lines = [f"{name.removesuffix('.JPEG')}\t{synsets.index(synset)}"
                 for name, synset in val_labels.items()]
    else:
        lines = ["ImageId,PredictionString"] + [
            f"{name.removesuffix('.JPEG')},{synset} 1 2 30 40 {synset} 5 6 7 8"
            for name, synset in val_labels.items()]
    labels_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run(image_folder, "--layout", "imagenet", "--src", src, "--out", out,
               "--val-labels", labels_file) == 0
    manifest = load_manifest(out)
    assert manifest.dataset == "imagenet2012"
    assert manifest.label_names == tuple(synsets)
    assert sorted(manifest.splits) == ["train", "validation"]
    check_round_trip(out, src, "train", image_files(src / "train"), synsets)
    records = read_split(out, "validation")
    assert {r.id: r.label for r in records} == {
        f"val/{name}": synsets.index(synset) for name, synset in val_labels.items()}
    for record in records:
        assert record.image == (src / record.id).read_bytes()


def test_imagenet_val_class_folders(tmp_path):
    src = tmp_path / "imagenet"
    synsets, _ = make_imagenet(src, val_folders=True)
    out = tmp_path / "out"
    assert run(image_folder, "--layout", "imagenet", "--src", src, "--out", out) == 0
    check_round_trip(out, src, "validation", image_files(src / "val"), synsets)


@pytest.mark.parametrize("problem", ["unknown_class", "missing_file", "extra_file", "no_file"])
def test_imagenet_val_label_errors_name_the_file(tmp_path, capsys, problem):
    src = tmp_path / "imagenet"
    _, val_labels = make_imagenet(src)
    labels_file = tmp_path / "val_labels.txt"
    lines = [f"{name} {synset}" for name, synset in val_labels.items()]
    if problem == "unknown_class":
        lines[1] = lines[1].split()[0] + " n99999999"
    elif problem == "missing_file":
        lines = lines[1:]
    elif problem == "extra_file":
        lines.append("ILSVRC2012_val_00099999.JPEG n01440764")
    if problem != "no_file":
        labels_file.write_text("\n".join(lines))
    assert run(image_folder, "--layout", "imagenet", "--src", src, "--out", tmp_path / "out",
               "--val-labels", labels_file) == 1
    error = capsys.readouterr().err
    assert str(labels_file) in error
    expected = {"unknown_class": "n99999999", "missing_file": "ILSVRC2012_val_00000001.JPEG",
                "extra_file": "ILSVRC2012_val_00099999.JPEG", "no_file": "does not exist"}
    assert expected[problem] in error
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_imagenet_holdout_size_is_appendix_e1():
    # BYOL Appendix E.1, Table 10: ImageNet, 1281167 original train examples = 1271158 train +
    # 10009 validation, "the last 10009 images of the official tensorflow ImageNet split".
    assert imagenet.IMAGENET_HOLDOUT_COUNT == 10009
    assert imagenet.IMAGENET_TRAIN_EXAMPLES == 1281167
    assert imagenet.IMAGENET_TRAIN_EXAMPLES - imagenet.IMAGENET_HOLDOUT_COUNT == 1271158


def help_of(module) -> subprocess.CompletedProcess:
    """``python -m MODULE --help``, as a person runs it (absl's help needs the process's own
    ``__main__`` and global flags)."""
    return subprocess.run([sys.executable, "-m", module.__name__, "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_image_folder_docs_say_its_holdout_is_not_the_papers():
    text = " ".join(help_of(image_folder).stdout.split())
    assert "SEEDED RANDOM CHOICE" in text and "not the paper's split" in text
    assert "NOT the paper's split" in text  # --imagenet-holdout's own help
    assert "NOT the paper's images" in " ".join(image_folder.__doc__.split())


def test_imagenet_holdout(tmp_path, capsys):
    src = tmp_path / "imagenet"
    synsets, val_labels = make_imagenet(src, val_folders=True)
    # On a 9-image tree the default count, 10009, is too large: it is what --imagenet-holdout uses.
    assert run(image_folder, "--layout", "imagenet", "--src", src, "--out", tmp_path / "big",
               "--imagenet-holdout") == 1
    assert "held-out count 10009" in capsys.readouterr().err
    out = tmp_path / "out"
    assert run(image_folder, "--layout", "imagenet", "--src", src, "--out", out,
               "--imagenet-holdout", "--holdout-count", 2) == 0
    manifest = load_manifest(out)
    assert {name: split.num_records for name, split in manifest.splits.items()} == {
        "train": 7, "holdout": 2, "validation": len(val_labels)}
    train = {r.id for r in read_split(out, "train")}
    holdout = {r.id for r in read_split(out, "holdout")}
    assert not train & holdout
    assert train | holdout == {p.relative_to(src).as_posix() for p in image_files(src / "train")}
    # The held-out split is the tail of train in the documented order.
    ordered = order.seeded_order(
        image_io.Example(id=i, label=0, data=b"") for i in train | holdout)
    assert holdout == {e.id for e in ordered[-2:]}


# ---------------------------------------------------------------------------------------------
# Held-out splits, determinism, resuming


@pytest.mark.parametrize("option,value,expected", [("--holdout-count", 3, 3),
                                                   ("--holdout-fraction", 0.2, 2),
                                                   ("--holdout-fraction", 0.34, 3)])
def test_holdout_count_and_fraction(tmp_path, option, value, expected):
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, option, value,
               "--holdout-name", "minival") == 0
    manifest = load_manifest(out)
    assert sorted(manifest.splits) == ["minival", "train"]
    train = {r.id for r in read_split(out, "train")}
    held = {r.id for r in read_split(out, "minival")}
    assert len(held) == expected and len(train) == 10 - expected
    assert not train & held
    assert train | held == {p.relative_to(src).as_posix() for p in image_files(src)}


def test_holdout_too_large_fails(tmp_path, capsys):
    src = make_class_tree(tmp_path / "src")
    assert run(image_folder, "--src", src, "--out", tmp_path / "out", "--holdout-count", 10) == 1
    assert "held-out count 10" in capsys.readouterr().err


def test_assignment_is_deterministic(tmp_path, monkeypatch):
    src = make_class_tree(tmp_path / "src")
    first, second = tmp_path / "a", tmp_path / "b"
    assert run(image_folder, "--src", src, "--out", first, "--num-shards", 3) == 0
    # The second conversion runs in two worker processes: same bytes.
    pools = []

    class RecordingPool(writer.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(writer.futures, "ProcessPoolExecutor", RecordingPool)
    assert run(image_folder, "--src", src, "--out", second, "--num-shards", 3, workers=2) == 0
    assert len(pools) == 1 and pools[0]._max_workers == 2
    assert len(shard_bytes(first)) == 3
    assert shard_bytes(first) == shard_bytes(second)
    assert load_manifest(first).splits == load_manifest(second).splits


def test_resume_skips_done_shards_and_rewrites_damaged_ones(tmp_path, capsys):
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"
    args = ("--src", src, "--out", out, "--examples-per-shard", 3)
    assert run(image_folder, *args) == 0
    assert summary_counts(capsys) == (4, 0)
    original = shard_bytes(out)
    names = sorted(original)

    assert run(image_folder, *args) == 0
    assert summary_counts(capsys) == (0, 4)

    def damage_and_rerun(damage):
        damage()
        assert run(image_folder, *args) == 0
        assert summary_counts(capsys) == (1, 3)
        assert shard_bytes(out) == original
        assert not list(out.glob("*.tmp"))
        load_manifest(out)  # a finished conversion always ends with a manifest

    damage_and_rerun(lambda: (out / names[1]).unlink())

    def corrupt():
        data = bytearray((out / names[2]).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / names[2]).write_bytes(bytes(data))

    damage_and_rerun(corrupt)
    damage_and_rerun(lambda: (out / (names[0] + ".tmp")).write_bytes(b"half a shard"))

    def interrupted_write():  # a crash before write_shard's rename: only the .tmp is left
        (out / names[3]).rename(out / (names[3] + ".tmp"))
        (out / (names[3] + ".json")).unlink()

    damage_and_rerun(interrupted_write)
    damage_and_rerun(lambda: (out / (names[0] + ".json")).unlink())


def test_resume_rewrites_when_the_plan_changes(tmp_path, capsys):
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--num-shards", 2) == 0
    capsys.readouterr()
    # Same shard names and sizes, another order: nothing may be skipped.
    assert run(image_folder, "--src", src, "--out", out, "--num-shards", 2,
               "--order-seed", 1) == 0
    assert summary_counts(capsys) == (2, 0)
    reference = tmp_path / "reference"
    assert run(image_folder, "--src", src, "--out", reference, "--num-shards", 2,
               "--order-seed", 1) == 0
    assert shard_bytes(out) == shard_bytes(reference)
    # Another shard count: the old shards and sidecars go, only the new plan is left.
    assert run(image_folder, "--src", src, "--out", out, "--num-shards", 3) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", MARKER_NAME] + [f"train-0000{i}-of-00003.array_record{suffix}"
                                          for i in range(3) for suffix in ("", ".json")])


def test_reencode_png(tmp_path):
    src = make_class_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--reencode", "png") == 0
    assert load_manifest(out).source["reencode"] == "png"
    for record in read_split(out, "train"):
        assert record.image.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(src / record.id) as source, Image.open(io.BytesIO(record.image)) as png:
            np.testing.assert_array_equal(np.asarray(png), np.asarray(source))


# ---------------------------------------------------------------------------------------------
# Clear errors


def test_missing_source_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run(image_folder, "--src", missing, "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert error.startswith("error:") and str(missing) in error


@pytest.mark.parametrize("layout,expected", [("unlabeled", "no images"),
                                             ("folders", "has no images")])
def test_empty_tree_fails_naming_it(tmp_path, capsys, layout, expected):
    src = tmp_path / "empty"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "readme.txt").write_text("no pictures here")
    assert run(image_folder, "--src", src, "--out", tmp_path / "out", "--layout", layout) == 1
    error = capsys.readouterr().err
    assert expected in error and str(src) in error


@pytest.mark.parametrize("module", [image_folder, digits, tfds_to_arrayrecord])
def test_help_is_absls_with_the_converters_own_flags(module):
    """Every command's ``--help`` (byol_flax.runtime.commands.run_command): the module's
    docstring, then its own flags, status 1 (absl's)."""
    done = help_of(module)
    assert done.returncode == 1 and not done.stderr, done.stderr
    assert done.stdout.startswith(module.__doc__.splitlines()[0])
    own = done.stdout.split("\nflags:\n", 1)[1]
    assert all(f"--{name}" in own or f"--[no]{name}" in own for name in module.COMMAND_FLAGS)
    assert "Try --helpfull" in own and "--flagfile" not in own  # absl's own flags: --helpfull


def test_converters_define_no_global_flags_and_start_from_the_defaults(tmp_path, capsys):
    """Each converter keeps its flags on its own FlagValues (the three share --out and more, and
    the study runner imports digits); an in-process call does not inherit the previous one's."""
    from absl import flags  # noqa: PLC0415

    for module in (image_folder, digits, tfds_to_arrayrecord):
        assert not any(name in flags.FLAGS for name in module.COMMAND_FLAGS), module.__name__
    src = make_class_tree(tmp_path / "src")
    assert run(image_folder, "--src", src, "--out", tmp_path / "a", "--holdout-count", 2,
               "--order-seed", 7) == 0
    assert run(image_folder, "--src", src, "--out", tmp_path / "b") == 0
    options = load_manifest(tmp_path / "b").source["options"]
    assert options["holdout_count"] is None and options["order_seed"] == 0
    assert set(load_manifest(tmp_path / "b").splits) == {"train"}


@pytest.mark.parametrize("argv,named", [
    (["--holdout-count", "0"], "--holdout-count=0"),
    (["--holdout-count", "3", "--holdout-fraction", "0.1"], "exclude each other"),
    (["--num-shards", "2", "--examples-per-shard", "3"], "exclude each other"),
    (["--test-fraction", "1"], "strictly between 0 and 1"),
    (["--bogus"], "bogus"),
    (["extra"], "extra"),
])
def test_a_bad_flag_is_one_line_with_status_2(tmp_path, capsys, argv, named):
    assert digits.main(["--out", str(tmp_path / "out"), "--no-progress", *argv]) == 2
    out, error = capsys.readouterr()
    assert not out and error.startswith("error: ") and named in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_tfds_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails, as here
    assert run(tfds_to_arrayrecord, "--name", "cifar10", "--data-dir", tmp_path / "tfds",
               "--out", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "tensorflow_datasets is not installed" in error
    assert "pip install '.[tfds]'" in error


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    reference = load_digits()
    out = tmp_path / "digits"
    assert run(digits, "--out", out, "--holdout-count", 100) == 0
    manifest = load_manifest(out)
    assert manifest.label_names == tuple(str(d) for d in range(10))
    counts = {name: split.num_records for name, split in manifest.splits.items()}
    assert sum(counts.values()) == 1797
    assert counts["test"] == 360  # ceil(0.2 * 1797), as scikit-learn rounds a test fraction
    assert counts["holdout"] == 100
    assert len(manifest.splits["train"].shards) == -(-counts["train"] // 256) > 1
    expected = np.round(reference.images * 255 / 16).astype(np.uint8)
    ids = set()
    for split in manifest.splits:
        labels = []
        for record in read_split(out, split):
            index = int(record.id.removeprefix("digits/"))
            with Image.open(io.BytesIO(record.image)) as image:
                assert image.format == "PNG" and image.mode == "L"
                np.testing.assert_array_equal(np.asarray(image), expected[index])
            assert record.label == reference.target[index]
            labels.append(record.label)
            ids.add(record.id)
        if split == "test":  # stratified: every class in proportion
            per_class = np.bincount(labels, minlength=10)
            share = np.bincount(reference.target, minlength=10) * 0.2
            assert np.all(np.abs(per_class - share) <= 1)
    assert ids == {f"digits/{i}" for i in range(1797)}


# ---------------------------------------------------------------------------------------------
# Bad input: symlinks, undecodable, oversized and 16-bit images, non-UTF-8 names


def left_out(out_dir):
    """{printable path: reason} of skipped_files.json, checked against its count."""
    listed = json.loads((out_dir / writer.SKIPPED_FILES_NAME).read_text())
    assert listed["count"] == len(listed["files"])
    return {item["file"]: item["reason"] for item in listed["files"]}


def truncated_jpeg(path, rng):
    write_image(path, rng, size=(32, 32))
    path.write_bytes(path.read_bytes()[:-200])  # header intact, scan data cut short
    return path


def png_claiming_size(path, width, height):
    """A valid 1x1 PNG whose header says width x height: a decompression bomb's header."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data follows the signature and tag
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("layout", ["folders", "unlabeled"])
def test_symlink_loops_and_linked_duplicates_are_converted_once(tmp_path, capsys, layout):
    src = make_class_tree(tmp_path / "src")
    real_files = image_files(src)
    (src / "cat" / "loop").symlink_to("..", target_is_directory=True)  # to the tree's root
    (src / "dog" / "nested" / "up").symlink_to("..", target_is_directory=True)  # to dog/
    (src / "eel" / "twin.png").symlink_to(src / "eel" / "eel_1.png")
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--layout", layout) == 0
    labels = ["cat", "dog", "eel"] if layout == "folders" else []
    check_round_trip(out, src, "train", real_files, labels)  # exactly the real images, once
    assert sorted(left_out(out)) == [str(src / "cat" / "loop"), str(src / "dog" / "nested" / "up"),
                                     str(src / "eel" / "twin.png")]
    assert "3 files left out" in capsys.readouterr().out
    assert load_manifest(out).source["left_out_files"] == 3


def test_link_from_one_class_folder_to_another_keeps_images_in_their_class(tmp_path):
    src = make_class_tree(tmp_path / "src")
    (src / "cat" / "dogs").symlink_to(src / "dog", target_is_directory=True)
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out) == 0
    check_round_trip(out, src, "train", image_files(src), ["cat", "dog", "eel"])


def make_bad_tree(root):
    """A class tree plus a truncated JPEG, a text file named .jpg and a decompression bomb."""
    src = make_class_tree(root)
    rng = np.random.default_rng(9)
    bad = {"truncated": truncated_jpeg(src / "dog" / "cut.jpg", rng),
           "text": src / "dog" / "notes.jpg",
           "bomb": png_claiming_size(src / "eel" / "bomb.png", 100_000, 100_000)}
    bad["text"].write_text("a text file with an image's extension")
    return src, bad


def test_bad_images_are_left_out_listed_and_stay_out_on_resume(tmp_path, capsys):
    src, bad = make_bad_tree(tmp_path / "src")
    out = tmp_path / "out"
    args = ("--src", src, "--out", out, "--examples-per-shard", 4)
    assert run(image_folder, *args) == 0
    reasons = left_out(out)
    assert sorted(reasons) == sorted(str(path) for path in bad.values())
    assert "cannot be fully decoded" in reasons[str(bad["truncated"])]
    assert "truncated" in reasons[str(bad["truncated"])]
    assert "not a readable image" in reasons[str(bad["text"])]
    assert "oversized" in reasons[str(bad["bomb"])]
    good = [p for p in image_files(src) if p not in bad.values()]
    records = check_round_trip(out, src, "train", good, ["cat", "dog", "eel"])
    for record in records:  # what training decodes
        assert augment.decode_image(record.image).size == (6, 5)
    assert "3 files left out" in capsys.readouterr().out
    # A resume skips every finished shard and still lists (and leaves out) the bad files.
    assert run(image_folder, *args) == 0
    written, skipped = summary_counts(capsys)
    assert written == 0 and skipped == len(load_manifest(out).splits["train"].shards)
    assert left_out(out) == reasons
    check_round_trip(out, src, "train", good, ["cat", "dog", "eel"])


@pytest.mark.parametrize("kind", ["truncated", "text", "bomb", "limit"])
def test_bad_image_error_mode_names_the_file_and_leaves_nothing_half_written(tmp_path, capsys,
                                                                            kind):
    src = make_class_tree(tmp_path / "src")
    rng = np.random.default_rng(2)
    extra = ()
    if kind == "truncated":
        bad = truncated_jpeg(src / "dog" / "cut.jpg", rng)
    elif kind == "text":
        bad = src / "dog" / "notes.jpg"
        bad.write_text("not an image")
    elif kind == "bomb":
        bad = png_claiming_size(src / "dog" / "bomb.png", 100_000, 100_000)
    else:  # an ordinary image over a lowered limit
        bad = write_image(src / "dog" / "big.png", rng, size=(8, 8))
        extra = ("--max-image-pixels", 40)
    out = tmp_path / "out"
    workers = 2 if kind == "text" else 1  # the error crosses from a worker process
    assert run(image_folder, "--src", src, "--out", out, "--on-bad-image", "error",
               "--examples-per-shard", 3, *extra, workers=workers) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: BadImage: bad image {bad}: ") and error.count("\n") == 1
    expected = {"truncated": "truncated", "text": "not a readable image", "bomb": "oversized",
                "limit": "8x8 = 64 pixels, over the limit of 40"}[kind]
    assert expected in error
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))
    for sidecar in out.glob("*.array_record.json"):  # finished shards are complete, for a resume
        meta = json.loads(sidecar.read_text())
        shard = out / meta["file"]
        assert file_sha256(shard) == meta["sha256"]
    # Skipping is the default: the same tree converts, without the bad image.
    assert run(image_folder, "--src", src, "--out", out, "--examples-per-shard", 3, *extra) == 0
    assert list(left_out(out)) == [str(bad)]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")
@pytest.mark.parametrize("mode", ["skip", "error"])
def test_non_utf8_file_name_is_left_out(tmp_path, capsys, mode):
    src = make_class_tree(tmp_path / "src")
    good = image_files(src)
    name = os.fsencode(src / "cat") + b"/bad\xff.png"
    with open(name, "wb") as f:
        Image.new("RGB", (3, 3)).save(f, format="PNG")
    out = tmp_path / "out"
    code = run(image_folder, "--src", src, "--out", out, "--on-bad-image", mode)
    printable = f"{src / 'cat'}/bad\\xff.png"  # the byte escaped, as in the list and errors
    if mode == "error":
        assert code == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: BadImage: bad image {printable}: file name is not "
                                "valid UTF-8")
        return
    assert code == 0
    assert list(left_out(out)) == [printable]
    check_round_trip(out, src, "train", good, ["cat", "dog", "eel"])


@pytest.mark.parametrize("reencode", ["none", "png"])
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path, capsys, reencode):
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    values = np.array([[65535, 256], [0, 1000]], np.uint16)
    Image.fromarray(values).save(src / "deep" / "x.png")
    write_image(src / "deep" / "y.png", np.random.default_rng(0))
    with Image.open(src / "deep" / "x.png") as image:
        assert image.mode in image_io.HIGH_BIT_DEPTH_MODES  # Pillow kept the 16 bits
    out = tmp_path / "out"
    assert run(image_folder, "--src", src, "--out", out, "--reencode", reencode) == 0
    records = {r.id: r for r in read_split(out, "train")}
    expected = np.array([[255, 1], [0, 3]], np.uint8)  # value >> 8
    with Image.open(io.BytesIO(records["deep/x.png"].image)) as stored:
        assert stored.format == "PNG" and stored.mode == "L"
        np.testing.assert_array_equal(np.asarray(stored), expected)
    rgb = np.asarray(augment.decode_image(records["deep/x.png"].image))  # what training sees
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))
    if reencode == "none":  # an 8-bit image keeps its bytes
        assert records["deep/y.png"].image == (src / "deep" / "y.png").read_bytes()
    converted = load_manifest(out).source["converted_to_8bit"]
    assert converted["count"] == 1 and converted["ids"] == ["deep/x.png"]
    assert "1 images of more than 8 bits" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The paper's held-out split: the last N images in TFDS order


def test_source_order_holdout_is_the_tail_as_given():
    examples = [image_io.Example(id=f"img{i:02d}", label=0, data=b"") for i in range(20)]
    given = examples[::-1]  # the order the source read them in
    split = order.order_and_hold_out({"train": given}, seed=0, holdout_count=4,
                                     holdout_order="source")
    assert {e.id for e in split["holdout"]} == {e.id for e in given[-4:]}
    assert {e.id for e in split["train"]} == {e.id for e in given[:-4]}
    seeded = order.order_and_hold_out({"train": given}, seed=0, holdout_count=4)
    assert {e.id for e in seeded["holdout"]} != {e.id for e in given[-4:]}
    assert split["train"] == order.seeded_order(split["train"])  # then written seeded


def fake_tfds(files, tmp_path):
    """A tensorflow_datasets stand-in: imagenet2012-like shards of (file_name, label, PNG).

    Like TFDS, reading interleaves the files unless ``interleave_cycle_length`` is 1.
    """
    class ImageFeature:
        pass

    class ClassLabel:
        def __init__(self, names):
            self.names = names

    class ReadConfig:
        def __init__(self, interleave_cycle_length=16):
            self.interleave_cycle_length = interleave_cycle_length

    def as_dataset(split, shuffle_files, decoders, read_config=None):
        assert split == "train" and not shuffle_files and decoders
        if read_config is not None and read_config.interleave_cycle_length == 1:
            rows = [row for file in files for row in file]
        else:
            rows = [row for group in zip(*files) for row in group]
        return [{"file_name": name.encode(), "label": label, "image": data}
                for name, label, data in rows]

    info = types.SimpleNamespace(
        version="5.1.0", splits={"train": types.SimpleNamespace(num_examples=sum(map(len, files)))},
        features={"image": ImageFeature(), "label": ClassLabel(["a", "b"]), "file_name": None})
    builder = types.SimpleNamespace(name="imagenet2012", data_dir=str(tmp_path / "tfds"), info=info,
                                    is_prepared=lambda: True, as_dataset=as_dataset)
    return types.SimpleNamespace(
        builder=lambda name, data_dir, try_gcs: builder, ReadConfig=ReadConfig,
        features=types.SimpleNamespace(Image=ImageFeature, ClassLabel=ClassLabel),
        decode=types.SimpleNamespace(SkipDecoding=lambda: "skip"), as_numpy=lambda ds: ds)


def test_tfds_imagenet_holdout_is_the_last_images_in_tfds_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)

    def png():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    files = [[(f"f{f}_{i}.JPEG", i % 2, png()) for i in range(5)] for f in range(2)]
    in_tfds_order = [name for file in files for name, _, _ in file]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(files, tmp_path))
    out = tmp_path / "out"
    assert run(tfds_to_arrayrecord, "--name", "imagenet2012", "--data-dir", tmp_path / "tfds",
               "--out", out, "--imagenet-holdout", "--holdout-count", 3) == 0
    holdout = {r.id for r in read_split(out, "holdout")}
    assert holdout == set(in_tfds_order[-3:])  # TFDS's train[-3:]
    assert {r.id for r in read_split(out, "train")} == set(in_tfds_order[:-3])
    interleaved_tail = {name for name, _, _ in [row for g in zip(*files) for row in g][-3:]}
    assert interleaved_tail != holdout  # the test tells TFDS order from the interleaved one
    source = load_manifest(out).source
    assert source["holdout"] == {"split": "holdout", "carved_from": "train", "count": 3,
                                 "fraction": None, "tail_of": "source"}
    assert source["converter"] == "byol_flax.data.convert.tfds_to_arrayrecord"


# ---------------------------------------------------------------------------------------------
# tfds_to_arrayrecord streams: a spool on disk in the seeded order, bounded memory, resumable


LIVE_EXAMPLES = [0]


def _forget_example():
    LIVE_EXAMPLES[0] -= 1


class CountedExample(image_io.Example):
    """An Example that counts the instances alive in LIVE_EXAMPLES."""

    def __post_init__(self):
        super().__post_init__()
        LIVE_EXAMPLES[0] += 1
        weakref.finalize(self, _forget_example)


def live_examples():
    return LIVE_EXAMPLES[0]


def streaming_tfds(tmp_path, num, *, fail_at=None, live_limit=None, reads=None):
    """fake_tfds with a lazy reader of ``num`` distinct PNGs in 3 files (f0_*, f1_*, f2_*).

    ``fail_at``: reading that index raises (a killed run). ``live_limit``: every read asserts
    that at most that many CountedExamples are alive (the converter holds no split).
    ``reads``: a list that counts the examples read.
    """
    files = [[(f"f{i % 3}_{i:05d}.JPEG", i % 2, None) for i in range(f, num, 3)] for f in range(3)]
    module = fake_tfds(files, tmp_path)
    builder = module.builder(None, None, None)

    def as_dataset(split, shuffle_files, decoders, read_config=None):
        assert split == "train" and not shuffle_files and decoders
        assert read_config.interleave_cycle_length == 1
        rng = np.random.default_rng(7)  # every reading reads the same images
        for index, (name, label, _) in enumerate(row for file in files for row in file):
            if index == fail_at:
                raise RuntimeError("killed")
            if live_limit is not None:
                assert live_examples() <= live_limit, f"{live_examples()} Examples alive"
            if reads is not None:
                reads.append(index)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buffer, "PNG")
            yield {"file_name": name.encode(), "label": label, "image": buffer.getvalue()}

    builder.as_dataset = as_dataset
    return module


TFDS_ARGS = ("--name", "imagenet2012", "--imagenet-holdout", "--holdout-count", 30,
             "--examples-per-shard", 32)


def shard_bytes(out_dir):
    manifest = load_manifest(out_dir)
    return {shard.file: (Path(out_dir) / shard.file).read_bytes()
            for split in manifest.splits.values() for shard in split.shards}


def test_tfds_streamed_conversion_equals_the_in_memory_one(tmp_path, monkeypatch):
    monkeypatch.setattr(order, "SPOOL_BUCKET_EXAMPLES", 16)  # many buckets, shards across them
    tfds = streaming_tfds(tmp_path, 300)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", tfds)
    out = tmp_path / "out"
    assert run(tfds_to_arrayrecord, *TFDS_ARGS, "--data-dir", tmp_path / "tfds", "--out", out) == 0
    assert not (out / tfds_to_arrayrecord.SPOOL_DIR).exists()
    # The previous implementation: the whole split in a list, ordered and carved in memory.
    builder = tfds.builder(None, None, None)
    listed = tfds_to_arrayrecord.read_split(tfds, builder, "train", image_key="image",
                                            label_key="label", pixel_format=None)
    ordered = order.order_and_hold_out({"train": listed}, seed=0, holdout_count=30,
                                       holdout_order="source")
    manifest = load_manifest(out)
    added = {"reencode", "sharding", "max_image_pixels", "left_out_files"}
    expected = writer.convert(
        tmp_path / "in_memory", ordered, dataset="imagenet2012", label_names=["a", "b"],
        source={k: v for k, v in manifest.source.items() if k not in added},
        sharding=writer.Sharding(examples_per_shard=32), progress=False)
    assert expected.manifest == manifest
    assert shard_bytes(out) == shard_bytes(tmp_path / "in_memory")
    assert len(manifest.splits["train"].shards) == 9  # 270 examples over 19 spool buckets
    assert manifest.source["holdout"]["tail_of"] == "source"
    assert {r.id for r in read_split(out, "holdout")} == {e.id for e in listed[-30:]}


def test_tfds_conversion_holds_no_split_in_memory(tmp_path, monkeypatch):
    # Reading: at most a few Examples alive (the old converter held all 300 by the end).
    monkeypatch.setattr(tfds_to_arrayrecord, "Example", CountedExample)
    monkeypatch.setattr(order, "Example", CountedExample)  # read back from the spool
    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        streaming_tfds(tmp_path, 300, live_limit=5))
    in_flight = []
    write_shard = writer.write_shard

    def counting_write_shard(path, shard_records):
        in_flight.append(live_examples())  # writing: the shard being written, no more
        return write_shard(path, shard_records)

    monkeypatch.setattr(writer, "write_shard", counting_write_shard)
    out = tmp_path / "out"
    assert run(tfds_to_arrayrecord, *TFDS_ARGS, "--data-dir", tmp_path / "tfds", "--out", out) == 0
    assert len(in_flight) == 10 and 0 < max(in_flight) <= 2 * 32
    assert load_manifest(out).splits["train"].num_records == 270


def test_tfds_conversion_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    data_dir, out = tmp_path / "tfds", tmp_path / "out"
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", streaming_tfds(tmp_path, 300))
    ref = tmp_path / "ref"
    assert run(tfds_to_arrayrecord, *TFDS_ARGS, "--data-dir", data_dir, "--out", ref) == 0
    reference = shard_bytes(ref)

    # Killed while reading: nothing written, the spool is not marked complete.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        streaming_tfds(tmp_path, 300, fail_at=100))
    with pytest.raises(RuntimeError, match="killed"):
        run(tfds_to_arrayrecord, *TFDS_ARGS, "--data-dir", data_dir, "--out", out)
    assert not list(out.glob("*.array_record")) and not (out / "manifest.json").exists()

    # Killed while writing the third shard: two shards are done.
    reads = []
    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        streaming_tfds(tmp_path, 300, reads=reads))
    write_shard, calls = writer.write_shard, []

    def dying_write_shard(path, shard_records):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return write_shard(path, shard_records)

    monkeypatch.setattr(writer, "write_shard", dying_write_shard)
    with pytest.raises(RuntimeError, match="killed"):
        run(tfds_to_arrayrecord, *TFDS_ARGS, "--data-dir", data_dir, "--out", out)
    assert len(reads) == 300 and len(list(out.glob("*.array_record"))) == 2
    monkeypatch.setattr(writer, "write_shard", write_shard)
    # A kill -9 leaves a half-written .tmp; a shard may be damaged afterwards.
    first, second = sorted(out.glob("train-*.array_record"))
    (out / (sorted(reference)[2] + ".tmp")).write_bytes(b"half a shard")
    second.write_bytes(second.read_bytes()[:100])

    reads.clear()
    capsys.readouterr()
    assert run(tfds_to_arrayrecord, *TFDS_ARGS, "--data-dir", data_dir, "--out", out) == 0
    assert reads == []  # the finished spool is reused: the source is not read again
    written, skipped = summary_counts(capsys)
    assert (written, skipped) == (len(reference) - 1, 1)  # only the first shard was kept
    assert shard_bytes(out) == reference
    assert not list(out.glob("*.tmp")) and not (out / tfds_to_arrayrecord.SPOOL_DIR).exists()


# ---------------------------------------------------------------------------------------------
# Staging a remote dataset on local disk (staging.copy_dataset, behind gs:// data dirs)


def make_dataset(root, payload=b"x"):
    """A two-shard dataset written with the real writer (records need not be images here)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = tuple(records.write_shard(root / records.shard_name("train", i, 2),
                                       [records.Record(payload * 1000 + bytes([i]), 0, f"{i}")])
                   for i in range(2))
    records.write_manifest(root, records.Manifest("d", ("0",), {"train": records.SplitInfo(
        2, shards)}))
    return root


def test_staging_copies_verifies_and_stamps_then_a_restart_does_nothing(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "bucket" / "ds")
    destination = tmp_path / "cache" / "ds"
    assert os.fspath(staging.copy_dataset(source, destination)) == str(destination)
    assert staging.is_verified_copy(destination)
    stamp = json.loads((destination / file_staging.VERIFIED_COPY_STAMP).read_text())
    assert stamp["source"] == str(source)
    assert stamp["manifest_sha256"] == file_sha256(source / "manifest.json")
    assert not list(tmp_path.glob("cache/*.partial"))
    for name in ("manifest.json", "train-00000-of-00002.array_record"):
        assert (destination / name).read_bytes() == (source / name).read_bytes()

    def forbidden(*args, **kwargs):
        raise AssertionError("a restart with a verified copy copied or hashed a shard")

    with monkeypatch.context() as patch:
        patch.setattr(storage_files, "sha256", forbidden)
        patch.setattr(file_staging, "_copy_file", forbidden)
        staging.copy_dataset(source, destination)
    # A changed source (new manifest) makes the stamp stale: copied again.
    make_dataset(source, payload=b"y")
    staging.copy_dataset(source, destination)
    assert (destination / "train-00001-of-00002.array_record").read_bytes() == (
        source / "train-00001-of-00002.array_record").read_bytes()
    assert staging.is_verified_copy(destination)
    # A local manifest that no longer matches the stamp is not a verified copy.
    (destination / "manifest.json").write_text((destination / "manifest.json").read_text() + " ")
    assert not staging.is_verified_copy(destination)


def test_staging_refuses_a_disk_without_room(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "bucket" / "ds")
    destination = tmp_path / "cache" / "new" / "ds"  # its parents do not exist yet
    asked = []

    def small_disk(path):
        asked.append(path)
        return shutil._ntuple_diskusage(10**9, 10**9 - 5 * 10**8, 5 * 10**8)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    with pytest.raises(records.DataError) as error:
        staging.copy_dataset(source, destination)
    message = str(error.value)
    assert "\n" not in message and str(destination) in message and str(source) in message
    assert re.search(r"needs 0\.00 GB .*0\.50 GB are free", message)
    assert asked and os.path.exists(asked[0])  # the destination's nearest existing parent
    assert not (destination / "manifest.json").exists()
    assert not staging.is_verified_copy(destination)


def test_staging_interrupted_copy_never_looks_complete_and_resumes(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "bucket" / "ds")
    destination = tmp_path / "cache" / "ds"
    copied = []
    path_type = type(epath.Path(source))
    real_copy = path_type.copy

    def copy_then_die(self, dst, overwrite=False):
        if copied:
            raise KeyboardInterrupt  # killed while copying the second shard
        copied.append(self.name)
        return real_copy(self, dst, overwrite=overwrite)

    monkeypatch.setattr(path_type, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        staging.copy_dataset(source, destination, workers=1)
    assert not destination.exists() and not staging.is_verified_copy(destination)
    monkeypatch.undo()
    copies = []
    monkeypatch.setattr(path_type, "copy",
                        lambda self, dst, overwrite=False: copies.append(self.name)
                        or real_copy(self, dst, overwrite=overwrite))
    staging.copy_dataset(source, destination)
    assert copies == ["train-00001-of-00002.array_record"]  # the finished shard was kept
    assert staging.is_verified_copy(destination)


def test_staging_names_a_corrupt_source_shard_and_recopies_a_damaged_kept_one(tmp_path):
    source = make_dataset(tmp_path / "bucket" / "ds")
    destination = tmp_path / "cache" / "ds"
    shard = source / "train-00001-of-00002.array_record"
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    with pytest.raises(records.DataError, match=r"train-00001-of-00002.array_record is corrupt"):
        staging.copy_dataset(source, destination)
    assert not destination.exists()
    # The damaged copy stays in the partial directory with the right size: repaired, not kept.
    shard.write_bytes(good)
    staging.copy_dataset(source, destination)
    assert (destination / shard.name).read_bytes() == good
    assert staging.is_verified_copy(destination)


def test_staging_does_not_replace_a_directory_holding_other_files(tmp_path):
    source = make_dataset(tmp_path / "bucket" / "ds")
    destination = tmp_path / "cache" / "ds"
    destination.mkdir(parents=True)
    (destination / "thesis.tex").write_text("precious")
    with pytest.raises(records.DataError, match=r"holds files that are not this dataset's"):
        staging.copy_dataset(source, destination)
    assert (destination / "thesis.tex").read_text() == "precious"


def test_staging_by_two_processes_at_once_copies_once(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "bucket" / "ds")
    destination = tmp_path / "cache" / "ds"
    path_type = type(epath.Path(source))
    real_copy = path_type.copy
    copies = []

    def slow_copy(self, dst, overwrite=False):
        copies.append(self.name)
        time.sleep(0.05)  # both starts are inside copy_dataset at the same time
        return real_copy(self, dst, overwrite=overwrite)

    monkeypatch.setattr(path_type, "copy", slow_copy)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # flock: one open file each
        done = [pool.submit(staging.copy_dataset, source, destination) for _ in range(2)]
        assert [os.fspath(d.result()) for d in done] == [str(destination)] * 2
    assert sorted(copies) == sorted(p.name for p in source.glob("*.array_record"))
    assert staging.is_verified_copy(destination)
