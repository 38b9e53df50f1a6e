"""Table 21 (Appendix J.1): no moving average (tau = 0, the target is a hard copy of the online
network) and a multiplier lambda on the predictor's learning rate."""

from byol_flax.config import NO_EMA
from byol_flax.studies.study import STUDIES, Row, Study

RESULTS = {0.0: (0.01, None), 1.0: (5.5, None), 2.0: (62.8, 1.5), 10.0: (66.6, None),
           20.0: (66.3, 0.3)}  # lambda -> (top-1, spread)


@STUDIES.register("table21")
def table21() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 21",
        description="tau = 0 with predictor learning-rate multiplier lambda",
        rows=tuple(
            Row(f"lambda{lam:g}", {**NO_EMA, "optimizer.predictor_lr_multiplier": lam}, top1,
                paper_spread=spread, note="collapse" if top1 < 10 else "")
            for lam, (top1, spread) in RESULTS.items()
        ) + (Row("baseline", {}, 72.5, note="BYOL with the EMA target"),),
    )
