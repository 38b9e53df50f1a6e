"""Table 20 (Appendix G.6): the normalisation in the loss (LN and BN divided by sqrt(d))."""

from byol_flax.studies.study import STUDIES, Row, Study


@STUDIES.register("table20")
def table20() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 20",
        description="Normalisation of predictions and targets in the loss",
        rows=(
            Row("l2", {"loss.normalization": "l2"}, 72.5, 90.8),
            Row("layernorm", {"loss.normalization": "layernorm"}, 72.5, 90.1, 0.4),
            Row("none", {"loss.normalization": "none"}, 67.4, 87.1),
            Row("batchnorm", {"loss.normalization": "batchnorm"}, 65.3, 85.3),
        ),
    )
