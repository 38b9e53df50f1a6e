"""Table 14 (Appendix G.1): projector / predictor depth (a) and projection dimension (b).

Depth is the number of Linear layers; depth 1 is one Linear layer (no BN, no ReLU). The Section 5
setup: 300 epochs, base LR 0.3, weight decay 1e-6, tau_base 0.99, batch 4096, 3 seeds.
"""

from byol_flax.studies.study import STUDIES, Row, Study

DEPTHS = {  # (projector depth, predictor depth) -> (top-1, top-5), Table 14a
    (1, 1): (61.9, 86.0), (1, 2): (65.0, 86.8), (1, 3): (65.7, 86.8),
    (2, 1): (71.5, 90.7), (2, 2): (72.5, 90.8), (2, 3): (71.4, 90.4),
    (3, 1): (71.4, 90.4), (3, 2): (72.1, 90.5), (3, 3): (72.1, 90.5),
}
PROJECTION_SIZES = {  # projector output dim -> (top-1, top-5, spread), Table 14b
    16: (69.9, 89.9, 0.3), 32: (71.3, 90.6, None), 64: (72.2, 90.9, None),
    128: (72.5, 91.0, None), 256: (72.5, 90.8, None), 512: (72.6, 91.0, None),
}


@STUDIES.register("table14")
def table14() -> Study:
    """The rows of this module's table, with the values the paper reports."""
    return Study(
        table="Table 14",
        description="Projector and predictor depth (a) and projection dimension (b)",
        rows=tuple(
            Row(f"projector{p}_predictor{q}",
                {"model.projector.depth": p, "model.predictor.depth": q}, top1, top5)
            for (p, q), (top1, top5) in DEPTHS.items()
        ) + tuple(
            Row(f"projection{size}", {"model.projector.output_size": size}, top1, top5, spread)
            for size, (top1, top5, spread) in PROJECTION_SIZES.items()
        ),
    )
