"""Converts image trees on disk (ImageNet, one folder per class, unlabeled) to ArrayRecord shards.

Image files are stored byte for byte (unless ``--reencode``; images of more than 8 bits per
sample become 8-bit PNG); ids are paths relative to SRC. Every split is written in the seeded
order of ``byol_flax.data.convert.order.seeded_order``. Symlinks are followed once by real
path; bad images and non-UTF-8 file names are left out and listed (see
``byol_flax.data.convert.image_io``).

Held-out splits are a seeded random choice: the tail of the seeded order. ``--imagenet-holdout``
holds out as many images as the paper (``IMAGENET_HOLDOUT_COUNT``) but NOT the paper's images,
which are the last ones of the TFDS train split in TFDS order (Appendix E.1): a file tree does
not have that order.
For the paper's exact split use ``byol_flax.data.convert.tfds_to_arrayrecord --imagenet-holdout``.
"""

import argparse
import csv
import pathlib
import sys
from collections.abc import Sequence

from absl import flags

from byol_flax.data.convert import cli, image_io, writer
from byol_flax.data.convert.image_io import Example
from byol_flax.data.imagenet import IMAGENET_HOLDOUT_COUNT, IMAGENET_TRAIN_EXAMPLES
from byol_flax.data.records import UNLABELED, DataError
from byol_flax.storage import files

LAYOUTS = ("imagenet", "folders", "unlabeled")
# Split folders recognized by the folders layout, and the split names they become.
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "validation",
                 "validation": "validation"}

_KEPT = IMAGENET_TRAIN_EXAMPLES - IMAGENET_HOLDOUT_COUNT
_EPILOG = f"""\
layouts:
  imagenet   SRC/train/<synset>/*.JPEG and SRC/val/ with either class folders or flat files plus
             --val-labels FILE. FILE is either whitespace-separated "<filename> <label>" lines
             (label: a synset or an index into the sorted synsets; filename with or without its
             extension) or Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the first
             token is the synset). Splits: train (+ holdout), validation.
             --imagenet-holdout holds out as many images as BYOL Appendix E.1
             ({IMAGENET_HOLDOUT_COUNT}; the other {_KEPT} stay in "train"), but a SEEDED RANDOM
             CHOICE of them (the tail of the seeded order), not the paper's split, which is
             the last {IMAGENET_HOLDOUT_COUNT} images of the TFDS train split in TFDS order:
             for that one, convert with python -m byol_flax.data.convert.tfds_to_arrayrecord
             --imagenet-holdout.
  folders    SRC/<class>/**/*.{{jpg,jpeg,png,bmp,gif,webp}} (any case). If SRC holds train/ and
             test/, val/ or validation/ class trees instead, each becomes a split (val ->
             validation) with the label names of train. Splits: train (+ holdout) (+ ...).
  unlabeled  every image under SRC, label -1, no label names. Split: train (+ holdout).

bad input:
  Symlinks are followed, each directory and each file once by real path (a link loop is walked
  once, a linked duplicate is left out). Every image is fully decoded; an unreadable, truncated
  or oversized one, or a file name that is not UTF-8, is left out and listed in
  OUT/skipped_files.json (--on-bad-image=error stops at the first instead). Images of more than
  8 bits per sample (16-bit PNG) are stored as 8-bit PNG, value >> 8; the manifest counts them.

examples:
  python -m byol_flax.data.convert.image_folder --layout imagenet --src /data/imagenet \\
      --out /data/imagenet_ar --imagenet-holdout --val-labels /data/LOC_val_solution.csv
  python -m byol_flax.data.convert.image_folder --layout folders --src flowers/ --out flowers_ar \\
      --holdout-fraction 0.1 --examples-per-shard 512
"""


def _subdirs(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _top_level_images(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and image_io.is_image_file(p.name))


def _example(path: pathlib.Path, src: pathlib.Path, label: int) -> Example:
    return Example(id=path.relative_to(src).as_posix(), label=label, path=str(path))


def _no_images_error(root: pathlib.Path) -> DataError:
    extensions = ", ".join(sorted(e.lstrip(".") for e in image_io.IMAGE_EXTENSIONS))
    return DataError(f"no images ({extensions}) found under {root}")


def class_tree(root: pathlib.Path, src: pathlib.Path, scan: image_io.ImageScan,
               label_names: Sequence[str] | None = None) -> tuple[list[Example], list[str]]:
    """Examples of a tree with one folder per class, and its sorted class names.

    With ``label_names`` given (the classes of train), the tree's folders must be among them.
    """
    if stray := _top_level_images(root):
        raise DataError(f"{stray[0]} lies directly in {root}, which should hold one folder per "
                        f"class ({len(stray)} such images)")
    folders = _subdirs(root)
    if not folders:
        raise DataError(f"{root} has no class folders")
    names = [folder.name for folder in folders]
    if bad := [name for name in names if not image_io.is_utf8(name)]:
        raise DataError(f"class folder {image_io.printable_path(root / bad[0])} has a name that is "
                        "not valid UTF-8: rename it (class names are stored as text)")
    if label_names is None:
        label_names = names
    elif unknown := sorted(set(names) - set(label_names)):
        raise DataError(f"{root} has class folders that train does not: {unknown[:5]}")
    index = {name: i for i, name in enumerate(label_names)}
    scan.claim(root)
    scan.claim(*folders, walk_later=True)
    examples = []
    for folder in folders:
        images = scan.find(folder)
        if not images:
            left_out = scan.left_out_under(folder) or [
                s for s in scan.skipped if s.file == image_io.printable_path(folder)]
            why = (f" ({len(left_out)} left out, e.g. {left_out[0].file}: {left_out[0].reason})"
                   if left_out else "")
            raise DataError(f"class folder {folder} has no images{why}")
        examples.extend(_example(path, src, index[folder.name]) for path in images)
    return examples, list(label_names)


def _resolve_label(token: str, index: dict[str, int], where: str) -> int:
    if token in index:
        return index[token]
    if token.isdigit():
        if int(token) < len(index):
            return int(token)
        raise DataError(f"{where}: class index {token} is out of range: there are {len(index)} "
                        "classes")
    raise DataError(f"{where}: unknown class {token!r} (not a train synset)")


def read_val_labels(path: pathlib.Path, label_names: Sequence[str]) -> dict[str, int]:
    """Maps the keys of a validation label file (file names or stems) to class indices."""
    if not path.is_file():
        raise DataError(f"validation label file {path} does not exist")
    index = {name: i for i, name in enumerate(label_names)}
    try:
        lines = files.read_text(path, what="validation label file").splitlines()
    except files.StorageError as error:
        raise DataError(str(error)) from None
    kaggle = bool(lines) and lines[0].replace(" ", "").lower().startswith(
        "imageid,predictionstring")
    if kaggle:
        rows = ((number, row[0], row[1].split()[0] if len(row) > 1 and row[1].split() else "")
                for number, row in enumerate(csv.reader(lines[1:]), start=2) if row)
    else:
        rows = ((number, *line.split()) for number, line in enumerate(lines, start=1)
                if line.strip() and not line.lstrip().startswith("#"))
    labels: dict[str, int] = {}
    for number, *fields in rows:
        where = f"{path}:{number}"
        if len(fields) != 2 or not fields[1]:
            raise DataError(f"{where}: expected '<filename> <label>'"
                            + (" (ImageId,PredictionString)" if kaggle else ""))
        key, label = fields[0], _resolve_label(fields[1], index, where)
        if labels.setdefault(key, label) != label:
            raise DataError(f"{where}: {key!r} has two different labels")
    return labels


def flat_validation(val_dir: pathlib.Path, src: pathlib.Path, labels_file: pathlib.Path,
                    label_names: Sequence[str], scan: image_io.ImageScan) -> list[Example]:
    """Examples of a flat val folder labelled by ``labels_file``; every file needs one label."""
    labels = read_val_labels(labels_file, label_names)
    images = scan.find(val_dir, recursive=False)
    if not images:
        raise _no_images_error(val_dir)
    examples, used, unlabeled = [], set(), []
    for path in images:
        key = path.name if path.name in labels else path.stem
        if key not in labels:
            unlabeled.append(path.name)
            continue
        used.add(key)
        examples.append(_example(path, src, labels[key]))
    if unlabeled:
        raise DataError(f"{labels_file} has no label for {len(unlabeled)} images of {val_dir}, "
                        f"e.g. {unlabeled[:3]}")
    if extra := sorted(set(labels) - used):
        raise DataError(f"{labels_file} names {len(extra)} files that are not in {val_dir}, "
                        f"e.g. {extra[:3]}")
    return examples


def imagenet_splits(src: pathlib.Path, val_labels: pathlib.Path | None, scan: image_io.ImageScan
                    ) -> tuple[dict[str, list[Example]], list[str]]:
    """train (and validation when SRC/val exists) of an ImageNet-style tree, synsets sorted."""
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise DataError(f"the imagenet layout needs {train_dir}/<synset>/: it does not exist")
    train, label_names = class_tree(train_dir, src, scan)
    splits = {"train": train}
    val_dir = src / "val"
    if not val_dir.is_dir():
        if val_labels is not None:
            raise DataError(f"--val-labels was given but {val_dir} does not exist")
        print(f"note: {val_dir} does not exist: writing train only", file=sys.stderr)
        return splits, label_names
    has_folders = bool(_subdirs(val_dir))
    if has_folders and _top_level_images(val_dir):
        raise DataError(f"{val_dir} mixes class folders and loose images")
    if has_folders:
        if val_labels is not None:
            raise DataError(f"{val_dir} has class folders: --val-labels is only for a flat val")
        splits["validation"], _ = class_tree(val_dir, src, scan, label_names)
    elif val_labels is None:
        raise DataError(f"{val_dir} holds loose images: give their labels with --val-labels")
    else:
        splits["validation"] = flat_validation(val_dir, src, val_labels, label_names, scan)
    return splits, label_names


def folder_splits(src: pathlib.Path, scan: image_io.ImageScan
                  ) -> tuple[dict[str, list[Example]], list[str]]:
    """One class tree (split train), or train/ plus test/ or val/ class trees as splits."""
    folders = {folder.name: folder for folder in _subdirs(src)}
    if "train" not in folders or not set(folders) <= set(SPLIT_FOLDERS):
        examples, label_names = class_tree(src, src, scan)
        return {"train": examples}, label_names
    train, label_names = class_tree(folders["train"], src, scan)
    splits = {"train": train}
    for name, folder in folders.items():
        split = SPLIT_FOLDERS[name]
        if split == "train":
            continue
        if split in splits:
            raise DataError(f"{src} has two folders for split {split!r} (val/ and validation/)")
        splits[split], _ = class_tree(folder, src, scan, label_names)
    return splits, label_names


def unlabeled_splits(src: pathlib.Path, scan: image_io.ImageScan
                     ) -> tuple[dict[str, list[Example]], list[str]]:
    images = scan.find(src)
    if not images:
        raise _no_images_error(src)
    return {"train": [_example(path, src, UNLABELED) for path in images]}, []


# The command's own flags (cli.run): importing this module defines no global absl flag.
COMMAND_FLAGS = flags.FlagValues()
cli.define_path("src", None, "source tree", COMMAND_FLAGS)
flags.mark_flag_as_required("src", flag_values=COMMAND_FLAGS)
flags.DEFINE_enum("layout", "folders", LAYOUTS, "how SRC is organised (see above)",
                  flag_values=COMMAND_FLAGS)
flags.DEFINE_string("dataset-name", None, "dataset name in the manifest (default: imagenet2012 "
                    "for the imagenet layout, else the name of SRC)", flag_values=COMMAND_FLAGS)
cli.define_path("val-labels", None, "imagenet layout: label file of a flat SRC/val/",
                COMMAND_FLAGS)
flags.DEFINE_boolean(
    "imagenet-holdout", False, f"imagenet layout: hold out {IMAGENET_HOLDOUT_COUNT} train "
    "images, as many as the paper, chosen at random by the seeded order: NOT the paper's split "
    f"(the last {IMAGENET_HOLDOUT_COUNT} in TFDS order; see tfds_to_arrayrecord); "
    "--holdout-count overrides the number, e.g. for a small test tree", flag_values=COMMAND_FLAGS)
cli.define_holdout_flags(COMMAND_FLAGS)
cli.define_order_seed_flag(COMMAND_FLAGS)
cli.define_reencode_flag(COMMAND_FLAGS)
cli.define_bad_image_flags(COMMAND_FLAGS)
cli.define_output_flags(COMMAND_FLAGS)


def convert(args: argparse.Namespace) -> writer.ConversionResult:
    src = args.src
    cli.check_out(args, src)
    if not src.is_dir():
        raise DataError(f"source directory {src} does not exist"
                        + (" (it is a file)" if src.exists() else ""))
    if args.val_labels is not None and args.layout != "imagenet":
        raise DataError("--val-labels needs --layout imagenet")
    if args.imagenet_holdout and args.layout != "imagenet":
        raise DataError("--imagenet-holdout needs --layout imagenet")
    policy = cli.policy_from_args(args)
    scan = image_io.ImageScan(policy)
    if args.layout == "imagenet":
        splits, label_names = imagenet_splits(src, args.val_labels, scan)
    elif args.layout == "folders":
        splits, label_names = folder_splits(src, scan)
    else:
        splits, label_names = unlabeled_splits(src, scan)
    holdout_count, holdout_fraction = cli.imagenet_holdout(args, len(splits["train"]),
                                                           str(src / "train"))
    default_name = "imagenet2012" if args.layout == "imagenet" else src.resolve().name
    source = cli.provenance("byol_flax.data.convert.image_folder", args, root=str(src.resolve()))
    return cli.convert_from_args(
        args, splits, dataset=args.dataset_name or default_name, label_names=label_names,
        source=source, seed=args.order_seed, holdout_count=holdout_count,
        holdout_fraction=holdout_fraction, reencode=args.reencode, policy=policy,
        left_out=scan.skipped)


def main(argv: Sequence[str] | None = None) -> int:
    """``byol-convert-images``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process
    (returns the exit status; :func:`byol_flax.data.convert.cli.run`)."""
    return cli.run(convert, __name__, COMMAND_FLAGS, argv, f"{__doc__}\n{_EPILOG}")


if __name__ == "__main__":
    raise SystemExit(main())
