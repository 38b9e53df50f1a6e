"""Table 15 (Appendix G.1): base learning rate (a) and weight decay (b), Section 5 setup."""

from byol_flax.studies.study import STUDIES, Row, Study

LEARNING_RATES = {  # base LR -> (top-1, top-5, spread of top-1)
    0.01: (34.8, 60.8, 3.0), 0.1: (65.0, 87.0, None), 0.2: (71.7, 90.6, None),
    0.3: (72.5, 90.8, None), 0.4: (72.3, 90.6, None), 0.5: (71.5, 90.1, None),
    1.0: (69.4, 89.2, None),
}
WEIGHT_DECAYS = {
    1e-7: (72.1, 90.4, None), 5e-7: (72.6, 91.0, None), 1e-6: (72.5, 90.8, None),
    5e-6: (71.0, 90.0, 0.3), 1e-5: (69.6, 89.3, 0.4),
}


@STUDIES.register("table15")
def table15() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 15",
        description="Base learning rate (a) and weight decay (b)",
        rows=tuple(
            Row(f"lr{lr:g}", {"optimizer.base_learning_rate": lr}, top1, top5, spread)
            for lr, (top1, top5, spread) in LEARNING_RATES.items()
        ) + tuple(
            Row(f"wd{wd:g}", {"optimizer.weight_decay": wd}, top1, top5, spread)
            for wd, (top1, top5, spread) in WEIGHT_DECAYS.items()
        ),
    )
