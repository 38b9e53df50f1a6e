"""The one deterministic example order of every conversion, and held-out splits carved off it.

Shard contents and held-out splits follow from the order seed and the example ids alone, so the
same source converts to the same shards on any machine.
"""

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

from byol_flax.data.convert.image_io import Example
from byol_flax.data.records import DataError

# The documented seed of the example order: changing it changes every shard and held-out split.
DEFAULT_ORDER_SEED = 0
DEFAULT_HOLDOUT_NAME = "holdout"
# Where a held-out split comes from: the tail of the seeded order, or the tail of the order the
# converter read the split in (TFDS order for tfds_to_arrayrecord: the paper's split).
HOLDOUT_ORDERS = ("seeded", "source")


def _order_key(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).digest()


def seeded_order(examples: Iterable[Example], seed: int = DEFAULT_ORDER_SEED) -> list[Example]:
    """The deterministic order of a split: sorted by id, then permuted by ``sha256(seed:id)``.

    A keyed hash rather than an RNG permutation: the order depends only on the seed and the ids,
    not on numpy's generator or the platform, and it mixes classes, so a held-out tail is spread
    across them.
    """
    return sorted(sorted(examples, key=lambda e: e.id), key=lambda e: _order_key(seed, e.id))


def holdout_size(num_examples: int, *, count: int | None = None,
                 fraction: float | None = None) -> int:
    """Number of examples to hold out (0 when neither is given); errors name the bad value."""
    if count is not None and fraction is not None:
        raise DataError("give a held-out count or a fraction, not both")
    if fraction is not None:
        if not 0.0 < fraction < 1.0:
            raise DataError(f"held-out fraction {fraction} must lie strictly between 0 and 1")
        count = max(1, math.floor(fraction * num_examples + 0.5))
    if count is None:
        return 0
    if not 0 < count < num_examples:
        raise DataError(f"held-out count {count} must be between 1 and {num_examples - 1}: "
                        f"the split it is carved from has {num_examples} examples")
    return count


def carve_holdout(examples: Sequence[Example], *, count: int | None = None,
                  fraction: float | None = None) -> tuple[list[Example], list[Example]]:
    """Splits an ordered split into (kept, held out): the held-out part is its tail."""
    size = holdout_size(len(examples), count=count, fraction=fraction)
    cut = len(examples) - size
    return list(examples[:cut]), list(examples[cut:])


def order_and_hold_out(splits: Mapping[str, Sequence[Example]], *, seed: int,
                       holdout_count: int | None = None, holdout_fraction: float | None = None,
                       holdout_name: str = DEFAULT_HOLDOUT_NAME,
                       holdout_from: str = "train",
                       holdout_order: str = "seeded") -> dict[str, list[Example]]:
    """Every split in the seeded order, with the tail of ``holdout_from`` moved out.

    The tail of the seeded order (a seeded random choice), or with ``holdout_order="source"``
    the tail of ``splits[holdout_from]`` as given: the paper's ImageNet split is the last
    IMAGENET_HOLDOUT_COUNT images in TFDS order (Appendix E.1). Both parts are then put in the
    seeded order.
    """
    if holdout_order not in HOLDOUT_ORDERS:
        raise DataError(f"holdout order {holdout_order!r} is not one of {HOLDOUT_ORDERS}")
    splits = dict(splits)
    if holdout_count is not None or holdout_fraction is not None:
        if holdout_from not in splits:
            raise DataError(f"cannot hold out examples of {holdout_from!r}: the splits are "
                            f"{sorted(splits)}")
        if holdout_name in splits:
            raise DataError(f"held-out split name {holdout_name!r} is already a split")
        source = splits[holdout_from]
        if holdout_order == "seeded":
            source = seeded_order(source, seed)
        splits[holdout_from], splits[holdout_name] = carve_holdout(
            source, count=holdout_count, fraction=holdout_fraction)
    return {name: seeded_order(examples, seed) for name, examples in splits.items()}
