"""The demo pipeline (byol_flax/studies/demo.py): its report, verdicts and plan. The smoke demo
itself runs once, from the installed wheel (tests/test_install.py), and is checked here with
:func:`assert_smoke_demo_outputs`."""

import json

import numpy as np
import pytest

from byol_flax.configs import common
from byol_flax.studies import demo, report, runner
from byol_flax.studies.study import with_data


def assert_smoke_demo_outputs(tmp_path) -> None:
    """What a smoke demo (``byol-demo --smoke``, seed 0, recipe digits) leaves in its workdir:
    the report with its keys and plots, every run and evaluation, the export with its card.
    tests/test_install.py runs the installed demo and checks its workdir with this."""
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["seeds"] == [0]
    for key in report.HEADLINE_KEYS + ("total_seconds", "device", "recipes", "accuracies"):
        assert key in saved, key
    for key in ("byol_linear_top1", "random_init_linear_top1", "raw_pixels_linear_top1",
                "byol_knn_top1", "byol_online_classifier_top1"):
        assert 0.0 <= saved[key] <= 1.0
    # One seed: margins are reported, with no verdict against a spread there is not.
    margins = saved["recipes"]["digits"]
    for byol_key, baseline in report.COMPARISONS:
        margin = margins[f"margin_{byol_key}_over_{baseline}"]
        assert margin["beats"] is None and margin["seeds"] == 1
        assert np.isclose(margin["margin"], saved[byol_key] - saved[baseline])
    assert saved["train_seconds"] > 0
    # Every accuracy with its split and seed; hyper-parameters chosen on holdout.
    rows = saved["accuracies"]
    assert len(rows) == len(report.METHODS)
    assert {(r["split"], r["selection_split"]) for r in rows} == {("test", "holdout")}
    assert {r["seed"] for r in rows} == {0}
    for plot in saved["plots"].values():
        assert (tmp_path / plot).stat().st_size > 1000, plot
    markdown = (tmp_path / "report.md").read_text()
    assert "## Verdict" in markdown and "digits" in markdown
    run = tmp_path / "digits" / "seed_0"
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints").is_dir()
    for evaluation in ("random_init_eval_linear", "pixels_eval_linear", "random_init_eval_knn",
                       "eval_linear_batchnorm", "random_init_eval_linear_batchnorm"):
        assert (run / evaluation / "results.json").exists()
    assert (tmp_path / "export" / "MODEL_CARD.md").exists()
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert {e["protocol"] for e in card["evaluations"]} == {"linear", "knn"}


def test_report_verdicts_use_twice_the_seed_std_and_explain_a_losing_recipe():
    def run(recipe, seed, byol, random_init, pixels, knn, random_knn, online):
        test = lambda value, metric="top1": {"test": {metric: value}}
        return {"row": recipe, "seed": seed, "steps": 10, "train_seconds": 1.0,
                "final_metrics": {"online_classifier/top1": online, "images_per_second": 5.0},
                "evaluations": {
                    "eval_linear": test(byol), "random_init_eval_linear": test(random_init),
                    "pixels_eval_linear": test(pixels), "eval_knn": test(knn, "top1_k20"),
                    "random_init_eval_knn": test(random_knn, "top1_k20"),
                    "eval_linear_batchnorm": test(byol),
                    "random_init_eval_linear_batchnorm": test(random_init)}}

    default = [run("small_image", s, 0.97 + 0.01 * s, 0.83, 0.96, 0.95, 0.90, 0.9)
               for s in range(3)]
    summary = report.recipe_summary(default)
    over_pixels = summary["margin_byol_linear_top1_over_raw_pixels_linear_top1"]
    # BYOL 0.98 +- 0.0082 vs pixels 0.96 +- 0: margin 0.02 > 2 x 0.0082.
    assert over_pixels["beats"] is True and over_pixels["twice_seed_std"] == pytest.approx(
        2 * np.std([0.97, 0.98, 0.99]))
    close = report.recipe_summary([run("small_image", s, 0.955 + 0.02 * s, 0.83, 0.96, 0.95,
                                       0.90, 0.9) for s in range(3)])
    assert close["margin_byol_linear_top1_over_raw_pixels_linear_top1"]["beats"] is False
    assert summary["byol_online_classifier_top1"]["mean"] == pytest.approx(0.9)
    lines = report._verdict("small_image", summary)
    assert len(lines) == len(report.COMPARISONS) and "**beat**" in lines[0]
    assert "BYOL linear on standardised features **beat** the same network at random " \
           "initialisation (linear on standardised features)" in lines[-1]


def test_unknown_recipe_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe.*'tiny'"):
        demo.run_demo(tmp_path, seeds=[0], recipes=["tiny"], smoke=True)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_smoke_demo_is_the_demo_with_the_smoke_switch_on_every_config():
    """--smoke runs the same plan (runs, evaluations, references, seeds) as the demo, each
    config being the full one with configs.common.smoke applied."""
    rows = [demo.recipe_row(recipe, recipe) for recipe in ("digits", "small_image")]
    full, smoke = (runner.plan(with_data(demo.demo_study(rows, seeds=(0, 1), smoke=s), "/d"),
                               "/w") for s in (False, True))
    assert [(r.workdir, [e.name for e in r.evaluations]) for r in full] == [
        (r.workdir, [e.name for e in r.evaluations]) for r in smoke]
    for big, small in zip(full, smoke):
        assert common.smoke(big.config).to_dict() == small.config.to_dict()
        for e_big, e_small in zip(big.evaluations, small.evaluations):
            assert e_big.source == e_small.source
            assert common.smoke(e_big.config).to_dict() == e_small.config.to_dict()


@pytest.mark.slow  # ~1-2 min: a smoke pre-training of the ViT and its six evaluations
def test_the_vit_recipe_runs_as_the_resnet_demo_does(tmp_path):
    """byol-demo --recipes=vit: the ViT with a BatchNorm final norm, trained and evaluated as
    the ResNet demo (same report, verdicts, plots, export)."""
    content = demo.run_demo(tmp_path, seeds=[0], recipes=["vit"], smoke=True)
    assert content["headline_recipe"] == "vit"
    config = content["configs"]["vit"]["pretrain"]
    assert config["model"]["encoder"]["name"] == "vit_micro"
    assert config["model"]["encoder"]["final_norm"] == "batchnorm"
    assert set(content["recipes"]["vit"]) >= set(report.METHODS)
    for plot in content["plots"].values():
        assert (tmp_path / plot).stat().st_size > 1000, plot
    markdown = (tmp_path / "report.md").read_text()
    assert "`vit`: BYOL linear on standardised features" in markdown
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert card["architecture"]["encoder"]["name"] == "vit_micro"
