"""Table 19 (Appendix G.4): intermediate variants between BYOL and SimCLR.

Columns: predictor (``mlp`` or ``identity``), target parameters (xi = ``ema``, sg(theta) =
``stop_gradient``, theta = ``online``), beta of Eq. 5 (alpha = 0.1). Rows as in the paper's
text. Our copy of the appendix lists (predictor, sg(theta), beta 1) twice, at 70.2 and 70.1
(the extraction lost a distinguishing mark); both rows are kept with their values.
"""

from byol_flax.studies.study import STUDIES, Row, Study

TARGETS = {"xi": "ema", "sg": "stop_gradient", "theta": "online"}
RESULTS = [  # (predictor?, target, beta, top-1)
    (True, "xi", 0.0, 72.5),  # BYOL
    (True, "xi", 1.0, 70.9),
    (False, "xi", 1.0, 70.7),
    (True, "sg", 1.0, 70.2),
    (False, "theta", 1.0, 69.4),  # SimCLR
    (True, "sg", 1.0, 70.1),
    (False, "sg", 1.0, 69.2),
    (True, "theta", 1.0, 69.0),
    (True, "sg", 0.0, 5.5),
    (True, "theta", 0.0, 0.3),
    (False, "xi", 0.0, 0.2),
    (False, "sg", 0.0, 0.1),
    (False, "theta", 0.0, 0.1),
]


def _name(predictor: bool, target: str, beta: float, seen: set[str]) -> str:
    name = f"{'predictor' if predictor else 'no_predictor'}_{target}_beta{beta:g}"
    name = name if name not in seen else f"{name}_second"
    seen.add(name)
    return name


@STUDIES.register("table19")
def table19() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    seen: set[str] = set()
    return Study(
        table="Table 19",
        description="Predictor x target parameters x beta, between BYOL and SimCLR",
        rows=tuple(
            Row(_name(predictor, target, beta, seen),
                {"model.predictor.kind": "mlp" if predictor else "identity",
                 "target.kind": TARGETS[target], "loss.beta": beta, "loss.temperature": 0.1},
                top1, note="collapse" if top1 < 10 else "")
            for predictor, target, beta, top1 in RESULTS
        ),
    )
