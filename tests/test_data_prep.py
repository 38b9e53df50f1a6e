"""data_prep/: the converters write what byol_flax.data.records reads, resumably and reproducibly.

Trees are a few tiny JPEG and PNG files made with Pillow; the records are read back with
ArrayRecord and compared with the source files byte for byte.
"""

import io
import re
import sys

import numpy as np
import pytest
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from byol_flax.data.records import (UNLABELED, decode_record, file_sha256, load_manifest,
                                    split_evenly, verify_shard, verify_split)
from data_prep import common, digits, image_folder, tfds_to_arrayrecord

CLASSES = {"cat": 3, "dog": 4, "eel": 3}
EXTENSIONS = (".jpg", ".png", ".JPEG", ".PNG")
SUMMARY = re.compile(r"(\d+) shards written, (\d+) skipped")


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
    return sorted(p for p in root.rglob("*") if common.is_image_file(p.name))


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
    assert manifest.source["converter"] == "data_prep.image_folder"
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


def test_imagenet_holdout(tmp_path, capsys):
    # BYOL Appendix D.1: 10009 held-out images, the other 1271158 of ImageNet's train for training.
    assert image_folder.IMAGENET_HOLDOUT_COUNT == 10009
    assert image_folder.IMAGENET_TRAIN_SIZE - image_folder.IMAGENET_HOLDOUT_COUNT == 1271158
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
    ordered = common.seeded_order(
        common.Example(id=i, label=0, data=b"") for i in train | holdout)
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

    class RecordingPool(common.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(common.futures, "ProcessPoolExecutor", RecordingPool)
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
        ["manifest.json"] + [f"train-0000{i}-of-00003.array_record{suffix}"
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


def test_broken_image_fails_naming_it(tmp_path, capsys):
    src = make_class_tree(tmp_path / "src")
    broken = src / "dog" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    assert run(image_folder, "--src", src, "--out", tmp_path / "out") == 1
    assert str(broken) in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("module", [image_folder, digits, tfds_to_arrayrecord])
def test_help_exits_zero(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module.__name__}")


def test_tfds_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails, as here
    assert run(tfds_to_arrayrecord, "--name", "cifar10", "--data-dir", tmp_path,
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
