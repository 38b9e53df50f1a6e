"""Appendix J.2: the closed-form optimal linear predictor of each batch, with tau = 0 and a
projection size of 16 (the predictor is a 16 x 16 matrix solved on the 4096-image batch).

The paper solves without regularisation; ``model.predictor.ridge`` (relative to the mean
eigenvalue of Z^T Z) is kept at its small default for numerical safety; set it to 0 to match.
"""

from byol_flax.config import NO_EMA
from byol_flax.studies.study import STUDIES, Row, Study


@STUDIES.register("j2_closed_form")
def j2_closed_form() -> Study:
    """Appendix J.2's rows, with the values the paper reports."""
    return Study(
        table="Appendix J.2",
        description="Closed-form optimal linear predictor, tau = 0, projection size 16",
        rows=(
            Row("closed_form_linear",
                {**NO_EMA, "model.predictor.kind": "closed_form_linear",
                 "model.projector.output_size": 16}, 50.3),
        ),
    )
