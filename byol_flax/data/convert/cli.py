"""The converters' shared command line: absl flags, their checks, and a converter's main tail.

Every converter defines its flags on its own :class:`absl.flags.FlagValues` (``COMMAND_FLAGS``,
with the ``define_*`` helpers; importing a converter defines no global flag, so the study runner
and tests can import them all), hands them to its ``convert(args)`` as an
``argparse.Namespace`` of the flag values (:func:`args_from_flags`, ``--holdout-count`` as
``args.holdout_count``), ends with :func:`convert_from_args` (order, hold out, write, summary
line), and runs through :func:`run` (:func:`byol_flax.runtime.commands.run_command`: ``--help``
and one ``error:`` line on bad input, as every command).
"""

import argparse
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags

from byol_flax.data.convert.image_io import (
    BAD_IMAGE_CHOICES,
    DEFAULT_MAX_IMAGE_PIXELS,
    JPEG_QUALITY,
    REENCODE_CHOICES,
    Example,
    ImagePolicy,
    SkippedFile,
)
from byol_flax.data.convert.order import (
    DEFAULT_HOLDOUT_NAME,
    DEFAULT_ORDER_SEED,
    order_and_hold_out,
)
from byol_flax.data.convert.writer import (
    DEFAULT_EXAMPLES_PER_SHARD,
    DEFAULT_WORKERS,
    SKIPPED_FILES_NAME,
    ConversionResult,
    Sharding,
    convert,
)
from byol_flax.data.imagenet import IMAGENET_HOLDOUT_COUNT, IMAGENET_TRAIN_EXAMPLES
from byol_flax.data.records import DataError
from byol_flax.runtime.outputs import check_output_dir


class _PathParser(flags.ArgumentParser):
    """A flag whose value is a ``pathlib.Path``."""

    def parse(self, argument: str) -> pathlib.Path:
        return pathlib.Path(argument)

    def flag_type(self) -> str:
        return "path"


class _FractionParser(flags.FloatParser):
    """A float strictly between 0 and 1 (absl's float bounds are inclusive)."""

    def __init__(self) -> None:
        super().__init__(lower_bound=0.0, upper_bound=1.0)
        self.syntactic_help = "a number strictly between 0 and 1"

    def is_outside_bounds(self, val: float) -> bool:
        return not 0.0 < val < 1.0


def define_path(name: str, default: str | None, description: str,
                flag_values: flags.FlagValues) -> flags.FlagHolder:
    """A flag whose value is a ``pathlib.Path`` (None when not given and no default)."""
    return flags.DEFINE(_PathParser(), name, default, description, flag_values=flag_values,
                        serializer=flags.ArgumentSerializer())


def define_positive_int(name: str, default: int | None, description: str,
                        flag_values: flags.FlagValues) -> flags.FlagHolder:
    return flags.DEFINE_integer(name, default, description, lower_bound=1,
                                flag_values=flag_values)


def define_fraction(name: str, default: float | None, description: str,
                    flag_values: flags.FlagValues) -> flags.FlagHolder:
    return flags.DEFINE(_FractionParser(), name, default, description, flag_values=flag_values,
                        serializer=flags.ArgumentSerializer())


def mark_exclusive(names: Sequence[str], flag_values: flags.FlagValues) -> None:
    """At most one of ``names`` on the command line (given ones count, not defaults: as
    argparse's exclusive groups, so ``--examples-per-shard`` keeps its default beside the
    exclusion)."""
    listed = " and ".join(f"--{name}" for name in names)

    def at_most_one(_values: dict[str, Any]) -> bool:
        return sum(1 for name in names if flag_values[name].present) <= 1

    flags.register_multi_flags_validator(list(names), at_most_one,
                                         message=f"{listed} exclude each other",
                                         flag_values=flag_values)


def define_output_flags(flag_values: flags.FlagValues, *,
                        examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD) -> None:
    """--out, the shard size (--num-shards | --examples-per-shard), --workers, --no-progress."""
    define_path("out", None, "output directory: shards, their .json sidecars and manifest.json; "
                "re-running into it resumes (finished shards are skipped)", flag_values)
    flags.mark_flag_as_required("out", flag_values=flag_values)
    define_positive_int("num-shards", None, "shards per split (capped at the split's size)",
                        flag_values)
    define_positive_int("examples-per-shard", examples_per_shard,
                        "target examples per shard, the shard count being rounded up",
                        flag_values)
    mark_exclusive(["num-shards", "examples-per-shard"], flag_values)
    define_positive_int("workers", DEFAULT_WORKERS, "worker processes, one shard per task",
                        flag_values)
    flags.DEFINE_boolean("no-progress", False, "no progress bar", flag_values=flag_values)


def define_holdout_flags(flag_values: flags.FlagValues, order: str = "the seeded order") -> None:
    """--holdout-count | --holdout-fraction and --holdout-name: a split carved off train."""
    define_positive_int("holdout-count", None, f"hold out the last N examples of train (in "
                        f"{order}) as a separate split, kept out of train", flag_values)
    define_fraction("holdout-fraction", None,
                    "like --holdout-count, with N = round(F * len(train))", flag_values)
    mark_exclusive(["holdout-count", "holdout-fraction"], flag_values)
    flags.DEFINE_string("holdout-name", DEFAULT_HOLDOUT_NAME, "name of the held-out split",
                        flag_values=flag_values)


def define_order_seed_flag(flag_values: flags.FlagValues, name: str = "order-seed") -> None:
    flags.DEFINE_integer(name, DEFAULT_ORDER_SEED, "seed of the example order: ids sorted, then "
                         "permuted by sha256('<seed>:<id>'); fixes shard contents and held-out "
                         "splits", flag_values=flag_values)


def define_reencode_flag(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_enum("reencode", "none", REENCODE_CHOICES, "store images as found (none) or "
                      f"re-encode them as png or jpeg (quality {JPEG_QUALITY})",
                      flag_values=flag_values)


def define_bad_image_flags(flag_values: flags.FlagValues) -> None:
    """--on-bad-image and --max-image-pixels."""
    flags.DEFINE_enum("on-bad-image", "skip", BAD_IMAGE_CHOICES,
                      "an unreadable, truncated or oversized image, or a file name that is not "
                      f"UTF-8: leave it out and list it in OUT/{SKIPPED_FILES_NAME} (skip) or "
                      "stop with an error naming it (error)", flag_values=flag_values)
    define_positive_int("max-image-pixels", DEFAULT_MAX_IMAGE_PIXELS,
                        "larger images (width x height) are bad: every training input worker "
                        "would decode them each epoch", flag_values)


def args_from_flags(flag_values: flags.FlagValues) -> argparse.Namespace:
    """The parsed flags by attribute (``--holdout-count`` as ``holdout_count``): what
    ``convert(args)`` reads and :func:`provenance` records."""
    return argparse.Namespace(**{name.replace("-", "_"): flag_values[name].value
                                 for name in flag_values if flag_values[name].name == name})


def run(body: Callable[[argparse.Namespace], object], module_name: str,
        flag_values: flags.FlagValues, argv: Sequence[str] | None, doc: str) -> int:
    """A converter's ``main``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process
    (returns the exit status: 0, 1 after bad input, 2 for a flag), through
    :func:`byol_flax.runtime.commands.run_command`; ``doc`` is its ``--help`` text."""
    from byol_flax.runtime import commands  # noqa: PLC0415

    def main(rest: list[str]) -> int:
        if len(rest) > 1:
            raise app.UsageError(f"unexpected arguments: {rest[1:]}")
        body(args_from_flags(flag_values))
        return 0

    return commands.run_command(main, module_name, flag_values=flag_values, argv=argv, doc=doc)


def imagenet_holdout(args: argparse.Namespace, num_train: int,
                     where: str) -> tuple[int | None, float | None]:
    """(count, fraction) to hold out: IMAGENET_HOLDOUT_COUNT with --imagenet-holdout.

    --holdout-count overrides the number (a small test tree); a train split that is not
    ImageNet's size gets a note, since the count is then not the paper's share.
    """
    if not args.imagenet_holdout:
        return args.holdout_count, args.holdout_fraction
    if args.holdout_fraction is not None:
        raise DataError("--imagenet-holdout holds out a count: it excludes --holdout-fraction")
    if args.holdout_count is not None:
        return args.holdout_count, None
    if num_train != IMAGENET_TRAIN_EXAMPLES:
        print(f"note: {where} has {num_train} images, not the {IMAGENET_TRAIN_EXAMPLES} of "
              f"ImageNet: holdout gets {IMAGENET_HOLDOUT_COUNT}, train the rest", file=sys.stderr)
    return IMAGENET_HOLDOUT_COUNT, None


def policy_from_args(args: argparse.Namespace) -> ImagePolicy:
    return ImagePolicy(on_bad=args.on_bad_image, max_pixels=args.max_image_pixels)


def sharding_from_args(args: argparse.Namespace) -> Sharding:
    if args.num_shards is not None:
        return Sharding(num_shards=args.num_shards, examples_per_shard=None)
    return Sharding(examples_per_shard=args.examples_per_shard)


def provenance(converter: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The manifest's ``source``: converter and every content-affecting option, JSON-safe."""
    ignored = {"out", "workers", "no_progress"}
    options = {key: (str(value) if isinstance(value, os.PathLike) else value)
               for key, value in sorted(vars(args).items()) if key not in ignored}
    return {"converter": converter, "options": options, **extra}


def check_out(args: argparse.Namespace, *inputs: os.PathLike | str) -> None:
    """Refuses ``--out`` before any image is read unless it is new, empty or an earlier
    conversion, and outside ``inputs`` (:func:`byol_flax.runtime.outputs.check_output_dir`)."""
    check_output_dir(args.out, "dataset", inputs=[os.fspath(i) for i in inputs])


def holdout_name(args: argparse.Namespace) -> str:
    return getattr(args, "holdout_name", DEFAULT_HOLDOUT_NAME)


def with_holdout(args: argparse.Namespace, source: Mapping[str, Any], count: int | None,
                 fraction: float | None, holdout_order: str) -> dict[str, Any]:
    """The manifest's ``source`` with how the held-out split was carved, when there is one."""
    source = dict(source)
    if count is not None or fraction is not None:
        source["holdout"] = {"split": holdout_name(args), "carved_from": "train",
                             "count": count, "fraction": fraction, "tail_of": holdout_order}
    return source


def convert_from_args(args: argparse.Namespace, splits: Mapping[str, Sequence[Example]], *,
                      dataset: str, label_names: Sequence[str], source: Mapping[str, Any],
                      seed: int, holdout_count: int | None = None,
                      holdout_fraction: float | None = None, holdout_order: str = "seeded",
                      reencode: str = "none", policy: ImagePolicy = ImagePolicy(),
                      left_out: Sequence[SkippedFile] = ()) -> ConversionResult:
    """The tail of every converter's main: order, hold out, write, print the summary line."""
    ordered = order_and_hold_out(splits, seed=seed, holdout_count=holdout_count,
                                 holdout_fraction=holdout_fraction, holdout_name=holdout_name(args),
                                 holdout_order=holdout_order)
    source = with_holdout(args, source, holdout_count, holdout_fraction, holdout_order)
    result = convert(args.out, ordered, dataset=dataset, label_names=label_names, source=source,
                     sharding=sharding_from_args(args), workers=args.workers, reencode=reencode,
                     progress=not args.no_progress, policy=policy, left_out=left_out)
    print(result.summary())
    return result
