"""Table 22 (Appendix J.1): tau = 0 with multipliers lambda (predictor) and mu (projector)."""

from byol_flax.config import NO_EMA
from byol_flax.studies.study import STUDIES, Row, Study

LAMBDAS = (1.0, 1.5, 2.0, 5.0, 10.0)
RESULTS = {  # mu -> top-1 (spread) per lambda in LAMBDAS
    1.0: ((3.2, 2.9), (25.7, 6.6), (60.8, 2.9), (66.7, 0.4), (66.9, None)),
    1.5: ((1.4, 2.0), (9.2, 7.0), (55.2, 5.8), (61.5, 0.6), (66.0, 0.3)),
    2.0: ((2.0, 2.8), (5.3, 1.9), (15.8, 13.4), (60.9, 0.8), (66.3, None)),
    5.0: ((1.5, 0.9), (2.5, 1.5), (2.5, 1.4), (20.5, 2.0), (60.5, 0.6)),
    10.0: ((0.1, None), (2.1, 0.3), (1.9, 0.8), (2.8, 0.4), (8.3, 6.8)),
}


@STUDIES.register("table22")
def table22() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 22",
        description="tau = 0 with predictor (lambda) and projector (mu) learning-rate multipliers",
        rows=tuple(
            Row(f"lambda{lam:g}_mu{mu:g}",
                {**NO_EMA, "optimizer.predictor_lr_multiplier": lam,
                 "optimizer.projector_lr_multiplier": mu}, top1, paper_spread=spread)
            for mu, values in RESULTS.items()
            for lam, (top1, spread) in zip(LAMBDAS, values)
        ),
    )
