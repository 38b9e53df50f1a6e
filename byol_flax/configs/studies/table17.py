"""Table 17 (Appendix G.3): image augmentation ablations, BYOL and the SimCLR reproduction.

T is ``augment.view1`` and T' is ``augment.view2`` (Table 6). "Symmetric" uses blur w.p. 0.5 and
solarisation w.p. 0.2 in both views. Removing a transformation sets its probability to 0; the
random resized crop is always kept.
"""

from byol_flax.config import SIMCLR
from byol_flax.studies.study import STUDIES, Row, Study

BOTH = ("view1", "view2")


def _zero(*names: str, views: tuple[str, ...] = BOTH) -> dict[str, float]:
    return {f"augment.{view}.{name}": 0.0 for view in views for name in names}


COLOR = ("color_jitter_prob", "grayscale_prob")
ALL = ("flip_prob", *COLOR, "blur_prob", "solarize_prob")
ABLATIONS = {  # name -> (overrides, BYOL top-1, SimCLR top-1, BYOL top-5, SimCLR top-5)
    "baseline": ({}, 72.5, 67.9, 90.8, 88.5),
    "remove_flip": (_zero("flip_prob"), 71.9, 67.3, 90.6, 88.2),
    "remove_blur": (_zero("blur_prob"), 71.2, 65.2, 90.3, 86.6),
    "remove_color": (_zero(*COLOR), 63.4, 45.7, 85.3, 70.6),
    "remove_color_jittering": (_zero("color_jitter_prob"), 71.8, 63.7, 90.7, 85.9),
    "remove_grayscale": (_zero("grayscale_prob"), 70.3, 61.9, 89.8, 84.1),
    "remove_blur_in_t2": (_zero("blur_prob", views=("view2",)), 72.4, 67.5, 90.8, 88.4),
    "remove_solarize_in_t2": (_zero("solarize_prob", views=("view2",)), 72.3, 67.7, 90.8, 88.2),
    "remove_blur_and_solarize_in_t2": (_zero("blur_prob", "solarize_prob", views=("view2",)),
                                       72.2, 67.4, 90.8, 88.1),
    "symmetric_blur_solarize": ({f"augment.{v}.{k}": p for v in BOTH
                                 for k, p in (("blur_prob", 0.5), ("solarize_prob", 0.2))},
                                72.5, 68.1, 90.8, 88.4),
    "crop_only": (_zero(*ALL), 59.4, 40.3, 82.4, 64.8),
    "crop_and_flip_only": (_zero(*COLOR, "blur_prob", "solarize_prob"), 60.1, 40.2, 83.0, 64.8),
    "crop_and_color_only": (_zero("flip_prob", "blur_prob", "solarize_prob"), 70.7, 64.2, 90.0,
                            86.2),
    "crop_and_blur_only": (_zero("flip_prob", *COLOR, "solarize_prob"), 61.1, 41.7, 83.9, 66.4),
}
SPREADS = {("byol", "remove_color"): 0.7, ("byol", "crop_only"): 0.3,
           ("simclr", "crop_only"): 0.3, ("byol", "crop_and_flip_only"): 0.3,
           ("byol", "crop_and_blur_only"): 0.3}


@STUDIES.register("table17")
def table17() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 17",
        description="Image augmentation ablations, BYOL and SimCLR (repro)",
        rows=tuple(
            Row(f"{method}_{name}", {**overrides, **extra},
                byol1 if method == "byol" else simclr1, byol5 if method == "byol" else simclr5,
                SPREADS.get((method, name)))
            for name, (overrides, byol1, simclr1, byol5, simclr5) in ABLATIONS.items()
            for method, extra in (("byol", {}), ("simclr", SIMCLR))
        ),
    )
