"""Table 16 (Appendix G.2): batch size, BYOL and the SimCLR reproduction.

"When reducing the batch size by a factor N, we average gradients over N consecutive steps and
update the target network once every N steps": the optimizer batch stays 4096 (so the learning
rate, 0.3 x 4096/256, and the step count are unchanged) and ``training.accumulation_steps = N``
makes BatchNorm see micro-batches of 4096 / N. Do not combine with the ``slice=`` argument of
``byol_imagenet.py``, which sets accumulation for memory instead.
"""

from byol_flax.config import SIMCLR
from byol_flax.studies.study import STUDIES, Row, Study

PAPER_BATCH = 4096
RESULTS = {  # batch -> (BYOL top-1, SimCLR top-1, BYOL top-5, SimCLR top-5, BYOL spread, SimCLR spread)
    4096: (72.5, 67.9, 90.8, 88.5, None, None),
    2048: (72.4, 67.8, 90.7, 88.5, None, None),
    1024: (72.2, 67.4, 90.7, 88.1, None, None),
    512: (72.2, 66.5, 90.8, 87.6, None, None),
    256: (71.8, 64.3, 90.7, 86.3, None, 2.1),
    128: (69.6, 63.6, 89.6, 85.9, 0.5, None),
    64: (59.7, 59.2, 83.2, 83.0, 1.5, 2.9),
}


@STUDIES.register("table16")
def table16() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 16",
        description="Batch size via gradient accumulation, BYOL and SimCLR (repro)",
        rows=tuple(
            Row(f"{method}_batch{batch}",
                {"training.accumulation_steps": PAPER_BATCH // batch, **extra},
                values[0 if method == "byol" else 1], values[2 if method == "byol" else 3],
                values[4 if method == "byol" else 5])
            for batch, values in RESULTS.items()
            for method, extra in (("byol", {}), ("simclr", SIMCLR))
        ),
    )
