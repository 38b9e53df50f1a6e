"""CPU-scale replication of Table 21 and Table 19's collapse findings on the bundled digits.

``python -m byol_flax.studies --study=cpu_collapse --workdir=workdirs/cpu_collapse``

The demo's setup (``digits_cpu`` with the ``small_image`` augmentation recipe:
resnet_tiny, 12 px, batch 128, 40 epochs = 402 steps, LARS, paper hyper-parameters otherwise),
scored by the collapse monitors and by linear and kNN evaluation on the held-out test split
(``eval_digits``, at the pre-training's 12 px). Rows:

* Table 21 (tau = 0, predictor learning-rate multiplier lambda): the paper finds collapse for
  lambda in {0, 1} and none for lambda >= 2;
* Table 19 (beta = 0): no predictor with the online network as target (theta) or its
  stop-gradient (sg(theta)) collapses, as does no predictor with the EMA target (xi); the SimCLR
  baseline (beta = 1, no predictor, theta) and BYOL do not.

The paper's values are ImageNet top-1 after 300 epochs with a ResNet-50: only the collapse /
no-collapse pattern is comparable, not the numbers.
"""

from byol_flax.config import NO_EMA, SIMCLR
from byol_flax.studies.study import STUDIES, Row, Study


@STUDIES.register("cpu_collapse")
def cpu_collapse() -> Study:
    """The CPU replication's rows, with the paper's values of the rows they replicate."""
    return Study(
        table="CPU replication of Tables 19 and 21",
        description="collapse with tau = 0 vs predictor LR multiplier; targets without predictor",
        config="digits_cpu:data={data},augment=small_image",
        evaluations=("eval_digits:linear,data={data}", "eval_digits:knn,data={data}"),
        seeds=(0,),
        data="digits",
        references={"random_init": ("eval_linear", "eval_knn")},
        overrides={"monitor.every_steps": 0, "logging.every_steps": 20},
        rows=(
            Row("byol", {}, 72.5, note="BYOL baseline"),
            *(Row(f"tau0_lambda{lam:g}", {**NO_EMA, "optimizer.predictor_lr_multiplier": lam}, top1,
                  note="collapse" if top1 < 10 else "no collapse")
              for lam, top1 in ((0.0, 0.01), (1.0, 5.5), (2.0, 62.8), (10.0, 66.6))),
            Row("no_predictor_theta", {"model.predictor.kind": "identity", "target.kind": "online"},
                0.1, note="collapse"),
            Row("no_predictor_sg_theta", {"model.predictor.kind": "identity",
                                          "target.kind": "stop_gradient"}, 0.1, note="collapse"),
            Row("no_predictor_xi", {"model.predictor.kind": "identity"}, 0.2, note="collapse"),
            Row("simclr", dict(SIMCLR), 69.4, note="no collapse"),
        ),
    )
