"""The demo: ``python -m byol_flax.studies.demo --workdir=workdirs/demo``.

BYOL end to end on real images on a laptop CPU, with its baselines, in one command:

1. convert scikit-learn's bundled 8x8 digits to ArrayRecord shards (``byol_flax.data.convert.digits``);
2. pre-train with ``train_and_evaluate`` (the body of ``byol_flax.main``) on
   ``byol_flax/configs/digits_cpu.py`` (its default recipe, chosen by the sweep in
   ``docs/demo_calibration.md``), with the kNN monitor and the official online classifier on the
   held-out split; ``--seeds=0,1,2`` for the seed spread, ``--recipes=digits,paper`` to add the
   paper's Table 6 augmentations;
3. evaluate, with the same protocol code and splits (``byol_flax/configs/eval_digits.py``: fit on
   train, choose the LR on holdout, report test): linear and kNN on the BYOL encoder, on the same
   architecture at random initialisation, and linear on raw pixels;
4. export the first run's encoder with its model card, and write ``report.md``,
   ``report.json`` and PNG plots (:mod:`byol_flax.studies.report`).

The console shows one line per stage, a progress bar per pre-training and the verdict; the full
log is ``<workdir>/log.txt`` (``--verbose`` prints it too). Everything lands in the workdir;
re-running resumes (finished pre-trainings are not redone).
"""

import json
import time
from collections.abc import Sequence
from typing import Any

from byol_flax.runtime import console

console.quiet_native_logs()  # before TensorFlow is imported (through CLU)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402

from byol_flax.studies import report  # noqa: E402
from byol_flax.config import training_steps  # noqa: E402
from byol_flax.data.pipeline import open_split  # noqa: E402
from byol_flax.evaluation import protocols
from byol_flax.export import model_card  # noqa: E402
from byol_flax.export.encoder import PIXELS_SOURCE, RANDOM_PREFIX, load_source  # noqa: E402
from byol_flax.evaluation.runner import evaluate  # noqa: E402
from byol_flax.studies.local_runs import enable_compilation_cache, prepare_data  # noqa: E402
from byol_flax.runtime.xla import configure_xla_flags  # noqa: E402
from byol_flax.sharding import make_mesh  # noqa: E402
from byol_flax.train import train_and_evaluate  # noqa: E402
from byol_flax.configs import digits_cpu, eval_digits  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where everything is written.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Pre-training / evaluation seeds (0,1,2: the spread).")
_RECIPES = flags.DEFINE_list("recipes", [digits_cpu.DEFAULT_RECIPE],
                             "Recipes of byol_flax/configs/digits_cpu.py to run, the first one is the "
                             f"headline; one of {list(digits_cpu.AUGMENTATION_RECIPES)} each.")
_QUICK = flags.DEFINE_boolean("quick", False, "Seconds-long smoke version (tests).")
_VERBOSE = flags.DEFINE_boolean("verbose", False, "Also print every log line on the console "
                                "(they always go to <workdir>/log.txt).")

# What each run evaluates: (result key, protocol, source kind).
EVALUATIONS = (("byol_linear", "linear", "byol"), ("byol_knn", "knn", "byol"),
               ("random_init_linear", "linear", "random_init"),
               ("random_init_knn", "knn", "random_init"), ("raw_pixels_linear", "linear", "pixels"))


def quick_overrides(pretrain: ml_collections.ConfigDict,
                    evaluations: Sequence[ml_collections.ConfigDict]) -> None:
    """Shrinks a run to seconds: same code paths, tiny sizes."""
    pretrain.data.image_size = 8
    pretrain.training.epochs = 2.0
    pretrain.training.warmup_epochs = 1.0
    pretrain.training.num_train_examples = 128
    pretrain.training.batch_size = 32
    pretrain.monitor.every_steps = 4
    pretrain.monitor.batch_size = 64
    pretrain.monitor.max_train_examples = 256
    pretrain.checkpoint.every_steps = 4
    pretrain.logging.every_steps = 2
    for evaluation in evaluations:
        evaluation.data.image_size = 8
        evaluation.linear.epochs = 2.0
        evaluation.linear.learning_rates = (0.4, 0.1)
        evaluation.feature_batch_size = 64
        evaluation.data.max_train_examples = 256


def demo_configs(data_dir: str, recipe: str, seed: int, overrides: dict[str, Any] | None = None,
                 quick: bool = False) -> tuple[ml_collections.ConfigDict, ...]:
    """(pre-training, linear evaluation, kNN evaluation) configs of one demo run.

    ``overrides``: dotted pre-training keys (the calibration sweep's points); the evaluations
    follow the pre-training's image size.
    """
    pretrain = digits_cpu.get_config(f"data={data_dir},augment={recipe}")
    pretrain.seed = seed
    pretrain.update_from_flattened_dict(overrides or {})  # locked: an unknown key fails
    linear = eval_digits.get_config(f"linear,data={data_dir}")
    knn = eval_digits.get_config(f"knn,data={data_dir}")
    for config in (linear, knn):
        config.seed = seed
        config.data.image_size = pretrain.data.image_size
    if quick:
        quick_overrides(pretrain, (linear, knn))
    return pretrain, linear, knn


def run_seed(workdir: epath.Path, data_dir: str, recipe: str, seed: int, quick: bool,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pre-trains one seed of one recipe and evaluates it and its baselines."""
    run_dir = workdir / recipe / f"seed_{seed}"
    pretrain, linear, knn = demo_configs(data_dir, recipe, seed, overrides, quick)
    pretrain_dir = run_dir / "pretrain"
    started = time.perf_counter()
    final = train_and_evaluate(pretrain, pretrain_dir)
    if not final:  # finished by an earlier run of the demo
        final = json.loads((pretrain_dir / "final_metrics.json").read_text())
    train_seconds = time.perf_counter() - started

    steps, _ = training_steps(pretrain, open_split(pretrain.data, "train").num_records)
    results = {"seed": seed, "recipe": recipe, "pretrain_dir": str(pretrain_dir),
               "train_seconds": train_seconds, "final_metrics": final, "steps": steps,
               "config": json.loads(pretrain.to_json_best_effort()),
               "eval_config": json.loads(linear.to_json_best_effort())}
    sources = {"byol": str(pretrain_dir), "random_init": RANDOM_PREFIX + str(pretrain_dir),
               "pixels": PIXELS_SOURCE}
    configs = {"linear": linear, "knn": knn}
    for key, protocol, source in EVALUATIONS:
        result = evaluate(configs[protocol], sources[source], str(run_dir / _eval_dir(key)))
        results[key] = result
        metric, value = next(iter(result["test"].items()))
        console.stage("  %-19s test %s %.3f (chosen on %s: %s)", key, metric, value,
                      result["selection_split"], json.dumps(result["selected"]))
    return results


def _eval_dir(key: str) -> str:
    """Result directory of an evaluation: ``linear_byol``, ``knn_random_init``, ``linear_pixels``."""
    source, _, protocol = key.rpartition("_")
    return f"{protocol}_{source.removeprefix('raw_')}"


def run_demo(workdir: epath.PathLike, *, seeds: Sequence[int], recipes: Sequence[str],
             quick: bool = False) -> dict[str, Any]:
    """The whole demo; returns report.json's content."""
    workdir = epath.Path(workdir).absolute() if "://" not in str(workdir) else epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    previous_cache = enable_compilation_cache(workdir / "jax_cache")
    try:
        return _run_demo(workdir, seeds=seeds, recipes=recipes, quick=quick)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous_cache)


def _run_demo(workdir: epath.Path, *, seeds: Sequence[int], recipes: Sequence[str], quick: bool
              ) -> dict[str, Any]:
    started = time.perf_counter()
    unknown = sorted(set(recipes) - set(digits_cpu.AUGMENTATION_RECIPES))
    if unknown:
        raise ValueError(f"--recipes: unknown recipe(s) {unknown}; choose from "
                         f"{list(digits_cpu.AUGMENTATION_RECIPES)}")
    data_dir = prepare_data(workdir)
    console.stage("data: scikit-learn's 1797 8x8 digits as ArrayRecord shards in %s", data_dir)
    runs = []
    plan = [(recipe, seed) for recipe in recipes for seed in seeds]
    for index, (recipe, seed) in enumerate(plan):
        elapsed = time.perf_counter() - started
        eta = f"; ETA {elapsed / index * (len(plan) - index) / 60:.1f} min" if index else ""
        console.stage("run %d of %d: recipe %s, seed %d (%.1f min elapsed%s)", index + 1,
                      len(plan), recipe, seed, elapsed / 60, eta)
        runs.append(run_seed(workdir, data_dir, recipe, seed, quick))
    first = runs[0]
    export_dir = model_card.export_with_model_card(
        first["pretrain_dir"], str(workdir / "export"),
        results=[str(epath.Path(first["pretrain_dir"]).parent / "linear_byol"),
                 str(epath.Path(first["pretrain_dir"]).parent / "knn_byol")],
        intended_use="Demonstration of BYOL pre-training on 8x8 digits; research and teaching.",
        out_of_scope_use="Any decision about people; any use outside 8x8 grayscale digits.",
        known_failures="Tiny images and data: features are specific to scikit-learn's digits.")
    console.stage("export: encoder and model card in %s", export_dir)
    embeddings = test_embeddings(first, quick)
    configs = {run["recipe"]: {"pretrain": run.pop("config"), "linear": run.pop("eval_config")}
               for run in runs}
    content = report.write_report(workdir, runs, embeddings=embeddings, export_dir=export_dir,
                                  total_seconds=time.perf_counter() - started,
                                  device=jax.devices()[0].device_kind, configs=configs,
                                  recipe_notes=digits_cpu.RECIPE_NOTES)
    console.stage("report: %s (plots beside it); %.1f min in all\n\n%s",
                  workdir / "report.md", content["total_seconds"] / 60,
                  report.console_table(content))
    return content


def test_embeddings(run: dict[str, Any], quick: bool
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test-split representations of a run's BYOL encoder and of its random-init twin."""
    config = ml_collections.ConfigDict(run["eval_config"])
    if quick:
        config.feature_batch_size = 64
    out = {}
    for name, source in (("BYOL", run["pretrain_dir"]),
                         ("random init", RANDOM_PREFIX + run["pretrain_dir"])):
        pretrained = load_source(source, seed=run["seed"], image_size=config.data.image_size)
        ctx = protocols.Context(config, pretrained, make_mesh(), protocols.SweepStore(None),
                                json.dumps(pretrained.origin, sort_keys=True))
        out[f"{name} (seed {run['seed']})"] = ctx.features(ctx.test)
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    log_file = console.setup(console.local_log_dir(_WORKDIR.value), verbose=_VERBOSE.value)
    console.stage("byol_flax demo: full log in %s", log_file)
    summary = run_demo(_WORKDIR.value, seeds=[int(s) for s in _SEEDS.value],
                       recipes=_RECIPES.value, quick=_QUICK.value)
    print(json.dumps({k: summary[k] for k in report.HEADLINE_KEYS}))


if __name__ == "__main__":
    app.run(main)
