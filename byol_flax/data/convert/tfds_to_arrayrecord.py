"""Converts a TFDS dataset already prepared on disk to ArrayRecord shards; never downloads.

Encoded images are read without decoding (``tfds.decode.SkipDecoding``) and stored as they are
(after a full decode check in the writer, as in every converter). Splits are streamed in one
pass into a spool on disk (``OUT/.spool``, a copy of the encoded images, removed at the end)
sorted into the seeded order shard by shard (:class:`byol_flax.data.convert.order.Spool`), so
memory stays flat whatever the split's size (ImageNet included) and the shards are those of an
in-memory conversion. A re-run after a kill reuses a finished spool and verified shards.

Held-out splits are the tail of train in TFDS order (files read one after the other), i.e.
TFDS's ``train[-N:]``: with ``--imagenet-holdout`` on imagenet2012 that is the paper's validation
split, the last ``IMAGENET_HOLDOUT_COUNT`` images of the TFDS train split (BYOL Appendix E.1).
Needs the optional extra: ``pip install '.[tfds]'``.
"""

import argparse
import functools
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tqdm
from absl import flags

from byol_flax.data.convert import cli, image_io, order, writer
from byol_flax.data.convert.image_io import Example
from byol_flax.data.imagenet import IMAGENET_HOLDOUT_COUNT
from byol_flax.data.records import UNLABELED, DataError
from byol_flax.runtime import logs

INSTALL_HINT = "pip install '.[tfds]'"
ID_FEATURES = ("id", "file_name")
SPOOL_DIR = ".spool"  # inside --out while converting


def import_tfds() -> Any:
    """tensorflow_datasets, or a DataError that says how to install it (it is optional)."""
    logs.quiet_native_logs()  # tensorflow_datasets imports TensorFlow
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError("tensorflow_datasets is not installed: it is the optional 'tfds' extra "
                        f"of byol_flax; install it with {INSTALL_HINT}") from error
    return tfds


def prepared_builder(tfds: Any, name: str, data_dir: pathlib.Path) -> Any:
    """The dataset's builder, only if it is prepared in ``data_dir`` (nothing is downloaded)."""
    try:
        builder = tfds.builder(name, data_dir=str(data_dir), try_gcs=False)
    except Exception as error:  # DatasetNotFoundError and friends: name them uniformly.
        raise DataError(f"TFDS has no dataset {name!r} in {data_dir}: {error}") from error
    prepared = (builder.is_prepared() if hasattr(builder, "is_prepared")
                else pathlib.Path(builder.data_dir).exists())
    if not prepared:
        raise DataError(f"{name} is not prepared in {data_dir} (looked for {builder.data_dir}); "
                        f"this converter never downloads: run `tfds build {name} "
                        f"--data_dir {data_dir}` first")
    return builder


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def image_is_encoded(tfds: Any, builder: Any, image_key: str) -> bool:
    """Whether the image feature holds encoded files (an Image) rather than pixel arrays."""
    features = builder.info.features
    if image_key not in features:
        raise DataError(f"{builder.name} has no image feature {image_key!r}; features: "
                        f"{sorted(features.keys())}")
    return isinstance(features[image_key], tfds.features.Image)


def iter_split(tfds: Any, builder: Any, split: str, *, image_key: str, label_key: str,
               pixel_format: str | None) -> Iterator[Example]:
    """Every example of ``split`` in TFDS order: example i is the one TFDS's ``split[i:i+1]`` reads.

    ``shuffle_files=False`` alone still interleaves 16 files at a time; one file at a time
    (``interleave_cycle_length=1``) reads them in sequence, the order TFDS's slicing counts in,
    so the tail is ``split[-N:]``, the paper's held-out images. Encoded images are kept as
    stored; pixel arrays are encoded as ``pixel_format``. A generator: one example at a time.
    """
    features = builder.info.features
    decoders = {image_key: tfds.decode.SkipDecoding()} if pixel_format is None else None
    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(interleave_cycle_length=1))
    id_key = next((key for key in ID_FEATURES if key in features), None)
    for index, values in enumerate(tfds.as_numpy(dataset)):
        image = values[image_key]
        data = bytes(image) if pixel_format is None else image_io.encode_image(image, pixel_format)
        label = int(values[label_key]) if label_key in features else UNLABELED
        example_id = _text(values[id_key]) if id_key else f"{split}/{index}"
        yield Example(id=example_id, label=label, data=data)


def read_split(tfds: Any, builder: Any, split: str, *, image_key: str, label_key: str,
               pixel_format: str | None) -> list[Example]:
    """:func:`iter_split` as a list (all in memory: for small splits and tests)."""
    return list(iter_split(tfds, builder, split, image_key=image_key, label_key=label_key,
                           pixel_format=pixel_format))


def label_names_of(tfds: Any, builder: Any, label_key: str) -> list[str]:
    """Class names of the label feature; none (unlabeled) when the dataset has no such feature."""
    features = builder.info.features
    if label_key not in features:
        return []
    if not isinstance(features[label_key], tfds.features.ClassLabel):
        raise DataError(f"{builder.name}: feature {label_key!r} is not a ClassLabel")
    return list(features[label_key].names)


# The command's own flags (cli.run): importing this module defines no global absl flag.
COMMAND_FLAGS = flags.FlagValues()
flags.DEFINE_string("name", None, "TFDS name, optionally with config and version (cifar10:3.0.2)",
                    flag_values=COMMAND_FLAGS)
cli.define_path("data-dir", None, "the TFDS data_dir the dataset was prepared in", COMMAND_FLAGS)
flags.mark_flags_as_required(["name", "data-dir"], flag_values=COMMAND_FLAGS)
flags.DEFINE_string("splits", None,
                    "comma-separated splits to convert (default: all of the dataset's)",
                    flag_values=COMMAND_FLAGS)
flags.DEFINE_string("image-key", "image", "image feature", flag_values=COMMAND_FLAGS)
flags.DEFINE_string("label-key", "label", "ClassLabel feature; absent means unlabeled",
                    flag_values=COMMAND_FLAGS)
flags.DEFINE_string("dataset-name", None, "dataset name in the manifest (default: --name)",
                    flag_values=COMMAND_FLAGS)
flags.DEFINE_boolean(
    "imagenet-holdout", False, "hold out the paper's validation split: the last "
    f"{IMAGENET_HOLDOUT_COUNT} examples of train in TFDS order (BYOL Appendix E.1, on "
    "imagenet2012); --holdout-count overrides the number, e.g. for a small test dataset",
    flag_values=COMMAND_FLAGS)
cli.define_holdout_flags(COMMAND_FLAGS, order="TFDS order, as the paper's ImageNet split")
cli.define_order_seed_flag(COMMAND_FLAGS)
cli.define_reencode_flag(COMMAND_FLAGS)
cli.define_bad_image_flags(COMMAND_FLAGS)
cli.define_output_flags(COMMAND_FLAGS)
_HELP = f"""{__doc__}
example:
  python -m byol_flax.data.convert.tfds_to_arrayrecord --name cifar10 \\
      --data-dir ~/tensorflow_datasets --out data/cifar10
"""


def _output_sizes(args: argparse.Namespace, builder: Any, wanted: Sequence[str],
                  holdout_count: int | None, holdout_fraction: float | None) -> dict[str, int]:
    """Examples per output split, from the builder's metadata: the held-out tail comes off train."""
    sizes = {split: builder.info.splits[split].num_examples for split in wanted}
    if holdout_count is None and holdout_fraction is None:
        return sizes
    name = cli.holdout_name(args)
    if name in sizes:
        raise DataError(f"held-out split name {name!r} is already a split")
    held = order.holdout_size(sizes["train"], count=holdout_count, fraction=holdout_fraction)
    return {**sizes, "train": sizes["train"] - held, name: held}


def _routed(tfds: Any, builder: Any, args: argparse.Namespace, wanted: Sequence[str],
            sizes: Mapping[str, int], pixel_format: str | None) -> Iterator[tuple[str, Example]]:
    """(output split, example) in TFDS order: train's tail (its index past the kept size) goes to
    the held-out split, as ``train[-N:]``."""
    for split in wanted:
        examples = iter_split(tfds, builder, split, image_key=args.image_key,
                              label_key=args.label_key, pixel_format=pixel_format)
        for index, example in enumerate(examples):
            held = split == "train" and index >= sizes["train"]
            yield (cli.holdout_name(args) if held else split), example


def _spool(tfds: Any, builder: Any, args: argparse.Namespace, out_dir: pathlib.Path,
           wanted: Sequence[str], sizes: Mapping[str, int],
           pixel_format: str | None) -> order.Spool:
    """The splits spooled in their seeded order; a finished spool of the same reading is kept."""
    spool = order.Spool(out_dir / SPOOL_DIR, seed=args.order_seed, sizes=sizes)
    identity = {"name": args.name, "data_dir": str(builder.data_dir), "splits": list(wanted),
                "tfds_version": str(builder.info.version), "image_key": args.image_key,
                "label_key": args.label_key, "pixels_encoded_as": pixel_format,
                "order_seed": args.order_seed, "sizes": dict(sizes)}
    if not spool.reusable(identity):
        pairs = _routed(tfds, builder, args, wanted, sizes, pixel_format)
        spool.write(tqdm.tqdm(pairs, total=sum(sizes.values()), unit="img",
                              desc=f"reading {args.name}", disable=args.no_progress,
                              dynamic_ncols=True), identity)
    return spool


def convert(args: argparse.Namespace) -> writer.ConversionResult:
    """Streams the splits into a spool on disk, then writes the shards from it."""
    cli.check_out(args, *([args.data_dir] if args.data_dir else []))
    tfds = import_tfds()
    builder = prepared_builder(tfds, args.name, args.data_dir)
    available = list(builder.info.splits.keys())
    wanted = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else available
    if unknown := [s for s in wanted if s not in available]:
        raise DataError(f"{args.name} in {args.data_dir} has no split {unknown}; it has "
                        f"{available}")
    encoded = image_is_encoded(tfds, builder, args.image_key)
    if not encoded and args.reencode == "none":
        raise DataError(f"{builder.name}: feature {args.image_key!r} holds pixel arrays, not "
                        "encoded images: choose their encoding with --reencode png (or jpeg)")
    # Pixel arrays are encoded once, while reading; encoded images are re-encoded only if asked.
    pixel_format = None if encoded else args.reencode
    holdout_count, holdout_fraction = cli.imagenet_holdout(
        args, builder.info.splits["train"].num_examples if "train" in available else 0,
        f"{args.name} train")
    if (holdout_count or holdout_fraction) and "train" not in wanted:
        raise DataError(f"a held-out split is carved from train, which --splits={args.splits!r} "
                        "leaves out")
    sizes = _output_sizes(args, builder, wanted, holdout_count, holdout_fraction)
    source = cli.provenance("byol_flax.data.convert.tfds_to_arrayrecord", args,
                            tfds_version=str(builder.info.version),
                            tfds_data_dir=str(builder.data_dir),
                            pixels_encoded_as=pixel_format)
    source = cli.with_holdout(args, source, holdout_count, holdout_fraction, "source")
    out_dir = writer.claim(args.out)
    spool = _spool(tfds, builder, args, out_dir, wanted, sizes, pixel_format)
    planned = {split: writer.PlannedSplit(size, functools.partial(spool.shards, split))
               for split, size in sizes.items()}
    result = writer.write_planned(
        out_dir, planned, dataset=args.dataset_name or builder.name,
        label_names=label_names_of(tfds, builder, args.label_key), source=source,
        sharding=cli.sharding_from_args(args), workers=args.workers,
        reencode=args.reencode if encoded else "none", progress=not args.no_progress,
        policy=cli.policy_from_args(args))
    spool.remove()
    print(result.summary())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``byol-convert-tfds``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process
    (returns the exit status; :func:`byol_flax.data.convert.cli.run`)."""
    return cli.run(convert, __name__, COMMAND_FLAGS, argv, _HELP)


if __name__ == "__main__":
    raise SystemExit(main())
