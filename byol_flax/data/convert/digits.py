"""Converts scikit-learn's 8x8 digits (real, shipped with the library: no download) to shards.

1797 grayscale images of 10 classes with values 0..16, each stored as an 8-bit grayscale PNG
(value * 255 / 16, rounded) with id ``digits/<index>``: small enough for the CPU demo to train on
in minutes, real enough that linear evaluation means something.
"""

import argparse
from collections.abc import Sequence

import numpy as np
from absl import flags

from byol_flax.data.convert import cli, image_io, order, writer
from byol_flax.data.convert.image_io import Example

DIGITS_MAX_VALUE = 16
DEFAULT_TEST_FRACTION = 0.2
# Small shards so that even this tiny train split has several: the data pipeline's sharding
# code paths run in the demo as they do on ImageNet.
DEFAULT_EXAMPLES_PER_SHARD = 256


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Maps digits' 0..16 intensities onto 0..255."""
    return np.rint(np.asarray(pixels, np.float64) * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)


def digit_examples() -> tuple[list[Example], np.ndarray]:
    """Every digit as a PNG example, and the labels (for the stratified split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    examples = [Example(id=f"digits/{index}", label=int(label),
                        data=image_io.encode_image(to_uint8(image), "png"))
                for index, (image, label) in enumerate(zip(digits.images, digits.target))]
    return examples, np.asarray(digits.target)


def train_test(examples: Sequence[Example], labels: np.ndarray, *, test_fraction: float,
               seed: int) -> dict[str, list[Example]]:
    """A stratified split, so that the small test set has every class in proportion."""
    from sklearn.model_selection import train_test_split

    train_index, test_index = train_test_split(np.arange(len(examples)), test_size=test_fraction,
                                               stratify=labels, random_state=seed)
    return {"train": [examples[i] for i in sorted(train_index)],
            "test": [examples[i] for i in sorted(test_index)]}


# The command's own flags (cli.run): importing this module (the study runner does) defines no
# global absl flag.
COMMAND_FLAGS = flags.FlagValues()
cli.define_fraction("test-fraction", DEFAULT_TEST_FRACTION,
                    "fraction of the images in the stratified test split", COMMAND_FLAGS)
flags.DEFINE_integer("seed", order.DEFAULT_ORDER_SEED,
                     "seed of the train/test split and of the example order",
                     flag_values=COMMAND_FLAGS)
flags.DEFINE_string("dataset-name", "digits", "dataset name in the manifest",
                    flag_values=COMMAND_FLAGS)
cli.define_holdout_flags(COMMAND_FLAGS)
cli.define_output_flags(COMMAND_FLAGS, examples_per_shard=DEFAULT_EXAMPLES_PER_SHARD)
_HELP = f"""{__doc__}
example:
  python -m byol_flax.data.convert.digits --out data/digits --holdout-count 200
"""


def convert(args: argparse.Namespace) -> writer.ConversionResult:
    import sklearn

    cli.check_out(args)

    examples, labels = digit_examples()
    splits = train_test(examples, labels, test_fraction=args.test_fraction, seed=args.seed)
    source = cli.provenance(
        "byol_flax.data.convert.digits", args, origin="sklearn.datasets.load_digits",
        sklearn_version=sklearn.__version__, image_size=[8, 8],
        encoding=f"8-bit grayscale PNG, value * 255 / {DIGITS_MAX_VALUE} rounded")
    return cli.convert_from_args(
        args, splits, dataset=args.dataset_name, label_names=[str(d) for d in range(10)],
        source=source, seed=args.seed, holdout_count=args.holdout_count,
        holdout_fraction=args.holdout_fraction)


def main(argv: Sequence[str] | None = None) -> int:
    """``byol-convert-digits``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process
    (returns the exit status; :func:`byol_flax.data.convert.cli.run`)."""
    return cli.run(convert, __name__, COMMAND_FLAGS, argv, _HELP)


if __name__ == "__main__":
    raise SystemExit(main())
