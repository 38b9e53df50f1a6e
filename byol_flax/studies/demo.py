"""The demo: ``python -m byol_flax.studies.demo --workdir=workdirs/demo``.

BYOL end to end on real images on a laptop CPU, with its baselines, in one command. The demo is
one study (:func:`demo_study`) run by the study runner (:mod:`byol_flax.studies.runner`):

1. convert scikit-learn's bundled 8x8 digits to ArrayRecord shards
   (``byol_flax.data.convert.digits``);
2. pre-train with ``train_and_evaluate`` (the body of ``byol_flax.main``) on ``digits_cpu`` (its
   default recipe, chosen by the sweep in ``docs/demo_calibration.md``), with the kNN monitor
   and the official online classifier on the held-out split; ``--seeds=0,1,2`` for the seed
   spread, ``--recipes=digits,paper`` to add the paper's Table 6 augmentations;
3. evaluate, with the same protocol code and splits (``eval_digits``: fit on train, choose the
   LR on holdout, report test): linear and kNN on the BYOL encoder and on the same architecture
   at random initialisation, and linear on raw pixels;

then adds its own part: the first run's encoder exported with its model card, and
``report.md``, ``report.json`` and PNG plots (:mod:`byol_flax.studies.report`). ``--smoke`` is
the seconds-long version (every config with ``smoke=True``; the tests and the install check).

The console shows one line per stage, a progress bar per pre-training and the verdict; the full
log is ``<workdir>/log.txt`` (``--verbose`` prints it too). Everything lands in the workdir;
re-running resumes (finished pre-trainings are not redone). A bad flag or workdir is one line
naming it (:mod:`byol_flax.runtime.commands`).
"""

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from byol_flax.configs import digits_cpu
from byol_flax.evaluation import Context, SweepStore
from byol_flax.export import model_card
from byol_flax.runtime import commands, console, logs
from byol_flax.runtime.outputs import claim_output_dir
from byol_flax.runtime.xla import configure_xla_flags
from byol_flax.sharding import make_mesh
from byol_flax.studies import report, runner
from byol_flax.studies.study import Row, Study, with_smoke
from byol_flax.train import WorkdirError
from byol_flax.weights.encoder import RANDOM_PREFIX, load_source

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where everything is written.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Pre-training / evaluation seeds (0,1,2: the spread).")
_RECIPES = flags.DEFINE_list("recipes", [digits_cpu.DEFAULT_RECIPE],
                             "Recipes of byol_flax/configs/digits_cpu.py to run, the first one is "
                             "the headline; one of "
                             f"{list(digits_cpu.AUGMENTATION_RECIPES)} each.")
_SMOKE = flags.DEFINE_boolean("smoke", False, "Seconds-long smoke version (smoke=True configs).")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "Also print every log line on the console "
                                "(they always go to <workdir>/log.txt).")

# The paper's linear protocol and kNN; beside them, linear on standardised features (the ViT probe).
EVALUATIONS = ("eval_digits:linear,data={data}", "eval_digits:knn,data={data}",
               "eval_digits:linear,data={data},feature_norm=batchnorm")


def recipe_row(name: str, recipe: str, overrides: Mapping[str, Any] | None = None) -> Row:
    """A row pre-training ``digits_cpu`` with ``recipe`` (and dotted ``overrides``: the
    calibration sweep's points)."""
    if recipe not in digits_cpu.AUGMENTATION_RECIPES:
        raise commands.CommandLineError(f"--recipes: unknown recipe {recipe!r}; choose from "
                                       f"{list(digits_cpu.AUGMENTATION_RECIPES)}")
    return Row(name, dict(overrides or {}), None,
               config=f"digits_cpu:data={{data}},augment={recipe}")


def demo_study(rows: Sequence[Row], *, seeds: Sequence[int] = (0,), smoke: bool = False) -> Study:
    """The demo as a study: linear and kNN evaluation of every row's encoder, with the same
    architecture at random initialisation and raw pixels (linear) as references on every run."""
    study = Study(
        table="demo", description="BYOL on scikit-learn's digits against its baselines",
        rows=tuple(rows), config="digits_cpu:data={data}", evaluations=EVALUATIONS,
        seeds=tuple(seeds), data="digits", references_every_run=True,
        references={"random_init": ("eval_linear", "eval_knn", "eval_linear_batchnorm"),
                    "pixels": ("eval_linear",)})
    return with_smoke(study) if smoke else study


def run_demo(workdir: epath.PathLike, *, seeds: Sequence[int], recipes: Sequence[str],
             smoke: bool = False) -> dict[str, Any]:
    """The whole demo; returns report.json's content."""
    started = time.perf_counter()
    workdir = runner.absolute_workdir(workdir)
    study = demo_study([recipe_row(recipe, recipe) for recipe in recipes], seeds=seeds,
                       smoke=smoke)
    runs = runner.run(study, workdir)
    first = runs[0]
    export_dir = model_card.export_with_model_card(
        first["dir"], str(workdir / "export"),
        results=[f"{first['dir']}/eval_linear", f"{first['dir']}/eval_knn"],
        intended_use="Demonstration of BYOL pre-training on 8x8 digits; research and teaching.",
        out_of_scope_use="Any decision about people; any use outside 8x8 grayscale digits.",
        known_failures="Tiny images and data: features are specific to scikit-learn's digits.")
    console.stage("export: encoder and model card in %s", export_dir)
    content = report.write_report(
        workdir, runs, embeddings=test_embeddings(first), export_dir=export_dir,
        total_seconds=time.perf_counter() - started, device=jax.devices()[0].device_kind,
        configs={run["row"]: {"pretrain": run["config"],
                              "linear": run["eval_configs"]["eval_linear"]} for run in runs},
        recipe_notes=digits_cpu.RECIPE_NOTES)
    console.stage("report: %s (plots beside it); %.1f min in all\n\n%s",
                  workdir / "report.md", content["total_seconds"] / 60,
                  report.console_table(content))
    return content


def test_embeddings(run: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test-split representations of a run's BYOL encoder and of its random-init twin."""
    config = ml_collections.ConfigDict(run["eval_configs"]["eval_linear"])
    out = {}
    for name, source in (("BYOL", run["dir"]), ("random init", RANDOM_PREFIX + run["dir"])):
        pretrained = load_source(source, seed=run["seed"], image_size=config.data.image_size)
        ctx = Context(config, pretrained, make_mesh(), SweepStore(None),
                      json.dumps(pretrained.origin, sort_keys=True))
        out[f"{name} (seed {run['seed']})"] = ctx.features(ctx.test)
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as error:
        raise commands.CommandLineError(f"--seeds={','.join(_SEEDS.value)}: not integers") \
            from error
    for recipe in _RECIPES.value:  # refused before anything is written
        recipe_row(recipe, recipe)
    claim_output_dir(_WORKDIR.value, "demo")  # a user's folder is refused before the log lands
    try:
        log_file = logs.setup(_WORKDIR.value, verbose=_VERBOSE.value)
    except OSError as error:
        raise WorkdirError(f"cannot write to the workdir {_WORKDIR.value}: {error}") from error
    console.stage("byol_flax demo: full log in %s", log_file)
    summary = run_demo(_WORKDIR.value, seeds=seeds, recipes=_RECIPES.value, smoke=_SMOKE.value)
    print(json.dumps({k: summary[k] for k in report.HEADLINE_KEYS}))


def run() -> None:
    """Console entry point."""
    commands.run_command(main, __name__)


if __name__ == "__main__":
    run()
