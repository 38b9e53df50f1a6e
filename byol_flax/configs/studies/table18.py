"""Table 18 (Appendix G.4): Eq. 5's temperature alpha and dispersion weight beta, with a
predictor and a target network (beta = 0 is BYOL)."""

from byol_flax.studies.study import STUDIES, Row, Study

RESULTS = {  # (beta, alpha) -> (top-1, top-5, spread of top-1)
    (0.0, 0.1): (72.5, 90.8, None),
    (0.1, 0.01): (72.2, 90.7, None), (0.1, 0.1): (72.4, 90.9, None),
    (0.1, 0.3): (72.7, 91.0, None), (0.1, 1.0): (72.6, 90.9, None),
    (0.1, 3.0): (72.5, 90.9, None), (0.1, 10.0): (72.5, 90.9, None),
    (0.5, 0.01): (70.9, 90.2, None), (0.5, 0.1): (72.0, 90.8, None),
    (0.5, 0.3): (72.7, 91.2, None), (0.5, 1.0): (72.7, 91.1, None),
    (0.5, 3.0): (72.6, 91.1, None), (0.5, 10.0): (72.5, 91.0, None),
    (1.0, 0.01): (53.9, 77.5, 0.5), (1.0, 0.1): (70.9, 90.3, None),
    (1.0, 0.3): (72.7, 91.1, None), (1.0, 1.0): (72.7, 91.1, None),
    (1.0, 3.0): (72.6, 91.0, None), (1.0, 10.0): (72.6, 91.1, None),
}


@STUDIES.register("table18")
def table18() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 18",
        description="InfoNCE interpolation (Eq. 5): weight beta x temperature alpha",
        rows=tuple(
            Row(f"beta{beta:g}_alpha{alpha:g}", {"loss.beta": beta, "loss.temperature": alpha},
                top1, top5, spread)
            for (beta, alpha), (top1, top5, spread) in RESULTS.items()
        ),
    )
