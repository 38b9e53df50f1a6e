"""Study modules (one per ablation table) and the runner that prints or runs them."""

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from byol_flax.config import SIMCLR, validate_config
from byol_flax.runtime import config_names
from byol_flax.studies import demo, runner
from byol_flax.studies import study as studies

REPO = Path(__file__).resolve().parents[1]
STUDY_DIR = REPO / "byol_flax" / "configs" / "studies"
ROW_COUNTS = {  # module -> rows of the paper's table
    "table14": 9 + 6, "table15": 7 + 5, "table16": 7 * 2, "table17": 14 * 2, "table18": 1 + 18,
    "table19": 13, "table20": 4, "table21": 5 + 1, "table22": 25, "j2_closed_form": 1,
}


def load(name: str) -> studies.Study:
    return studies.load_study(name)


def test_a_study_is_named_or_given_by_path():
    by_path = studies.load_study(str(STUDY_DIR / "table21.py"))
    assert by_path == load("table21") == studies.load_study("studies/table21")
    assert by_path.config == "byol_imagenet_300ep:r50x1"  # names, as a printed command has them
    with pytest.raises(config_names.UnknownConfigError, match="'table99'.*table21"):
        studies.load_study("table99")


@pytest.mark.parametrize("name, rows", ROW_COUNTS.items())
def test_every_table_module_builds_valid_configs_for_all_rows(name, rows):
    study = load(name)
    assert len(study.rows) == rows
    assert len({row.name for row in study.rows}) == rows
    assert study.seeds == (0, 1, 2)  # Appendix G: averaged over 3 seeds
    for row in study.rows:
        config = studies.row_config(study, row, seed=1, extra={"data.dir": "/imagenet"})
        validate_config(config, num_devices=8)
        # Section 5 / Appendix G setup underneath every row.
        assert config.training.epochs == 300.0 and config.training.batch_size == 4096
        for key, value in row.overrides.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, row.name, key)


def test_paper_values_of_the_tables():
    """Spot checks against the appendix (Tables 14-22, J.2)."""
    t14 = load("table14")
    assert t14.row("projector2_predictor2").paper_top1 == 72.5
    assert t14.row("projector1_predictor1").paper_top1 == 61.9
    assert t14.row("projection16").paper_spread == 0.3
    assert load("table15").row("lr0.01").paper_top1 == 34.8
    t16 = load("table16")
    assert t16.row("byol_batch256").overrides["training.accumulation_steps"] == 16
    assert (t16.row("byol_batch64").paper_top1, t16.row("simclr_batch64").paper_top1) == (59.7,
                                                                                          59.2)
    t17 = load("table17")
    assert t17.row("simclr_remove_color").paper_top1 == 45.7
    assert t17.row("byol_remove_blur_in_t2").overrides == {"augment.view2.blur_prob": 0.0}
    assert load("table18").row("beta1_alpha0.01").paper_top1 == 53.9
    t19 = load("table19")
    assert t19.row("no_predictor_theta_beta1").overrides == SIMCLR
    assert t19.row("no_predictor_theta_beta1").paper_top1 == 69.4
    assert t19.row("predictor_sg_beta0").paper_top1 == 5.5
    assert t19.row("predictor_sg_beta0").overrides["target.kind"] == "stop_gradient"
    assert load("table20").row("batchnorm").paper_top1 == 65.3
    t21 = load("table21")
    assert [r.paper_top1 for r in t21.rows] == [0.01, 5.5, 62.8, 66.6, 66.3, 72.5]
    assert t21.row("lambda2").overrides == {"target.base_ema": 0.0, "target.schedule": "constant",
                                            "optimizer.predictor_lr_multiplier": 2.0}
    assert load("table22").row("lambda2_mu1.5").paper_top1 == 55.2
    j2 = load("j2_closed_form").rows[0]
    assert j2.paper_top1 == 50.3 and j2.overrides["model.projector.output_size"] == 16


def test_unknown_override_is_named_with_its_row():
    study = load("table20")
    bad = studies.Row("typo", {"loss.normalisation": "l2"}, None)
    with pytest.raises(KeyError, match=r"Table 20 row typo: override 'loss.normalisation'"):
        studies.row_config(study, bad, seed=0)


def parse_command(command: str, program: str):
    """The config (and other flags) ``python -m PROGRAM`` builds from a printed command: its
    ``--config=NAME`` resolved as the entry points do, then absl's config flag."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", program]
    argv = ["main", *config_names.resolve_flag(argv[3:])]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    for name in ("workdir", "source"):
        flags.DEFINE_string(name, None, "", flag_values=values)
    values(argv)
    return values


def test_printed_commands_build_the_same_configs_as_the_runner(capsys):
    assert runner.main(["--study=table21", "--workdir=gs://b/t21", "--print",
                        "--set=data.dir=gs://b/imagenet", "--eval_set=data.dir=gs://b/imagenet",
                        "--seeds=4", "--rows=lambda2,baseline"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # (pre-training + linear evaluation) x 2 rows x 1 seed
    study = runner.select_rows(load("table21"), ["lambda2", "baseline"])
    plan = runner.plan(study, "gs://b/t21", seeds=[4], extra={"data.dir": "gs://b/imagenet"},
                       eval_extra={"data.dir": "gs://b/imagenet"})
    for (train, evaluate), run in zip(zip(lines[::2], lines[1::2]), plan):
        assert train.startswith("python -m byol_flax.main --config=byol_imagenet_300ep:r50x1 ")
        values = parse_command(train, "byol_flax.main")
        assert json.loads(values.config.to_json()) == json.loads(run.config.to_json())
        assert values.workdir == run.workdir == f"gs://b/t21/{run.row.name}/seed_4"
        assert evaluate.startswith("python -m byol_flax.evaluation --config=eval_imagenet:linear ")
        values = parse_command(evaluate, "byol_flax.evaluation")
        (planned,) = run.evaluations
        assert json.loads(values.config.to_json()) == json.loads(planned.config.to_json())
        assert (values.source, values.workdir) == (run.workdir, f"{run.workdir}/eval_linear")


def test_printed_digits_study_converts_the_data_and_scores_its_references(capsys):
    assert runner.main(["--study=cpu_collapse", "--workdir=w", "--print", "--rows=byol,simclr",
                        "--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("python -m byol_flax.data.convert.digits --out w/data --holdout-count "
                        f"{runner.HOLDOUT_COUNT}")
    # The first run: pre-training, then linear and kNN on it and on its random initialisation;
    # later runs: no references.
    sources = [line.split("--source=")[1].split()[0] for line in lines[1:] if "--source" in line]
    assert sources == ["w/byol/seed_0", "random:w/byol/seed_0"] * 2 + ["w/simclr/seed_0"] * 2
    values = parse_command(lines[1], "byol_flax.main")
    assert values.config.data.dir == "w/data" and values.config.data.image_size == 8  # smoke
    evaluation = parse_command(lines[2], "byol_flax.evaluation").config
    assert (evaluation.data.image_size, evaluation.feature_batch_size) == (8, 64)


def test_the_runner_takes_absl_flags_in_process_one_call_after_another(capsys):
    """``runner.main(argv)`` parses into the runner's own flags (importing it defines no global
    flag); a call starts from the defaults again, and a bad flag is one line, status 2."""
    # Other commands (byol_flax.main, the demo) define global flags of the same names, and this
    # process may have imported them: none of the runner's own flag objects is global.
    assert not any(name in flags.FLAGS and flags.FLAGS[name] is runner.COMMAND_FLAGS[name]
                   for name in runner.COMMAND_FLAGS)
    assert runner.main(["--study", "cpu_collapse", "--workdir", "w", "--print", "--rows=byol",
                        "--smoke", "--set=training.epochs=2", "--set=seed=3"]) == 0
    smoke = capsys.readouterr().out
    assert "smoke=True" in smoke and "--config.training.epochs=2 " in smoke
    assert runner.main(["--study=cpu_collapse", "--workdir=w", "--print", "--rows=byol"]) == 0
    again = capsys.readouterr().out
    assert "smoke=True" not in again and "training.epochs=2" not in again
    for argv, named in ((["--study=cpu_collapse"], "--workdir"),
                        (["--study=cpu_collapse", "--workdir=w", "--bogus"], "bogus"),
                        (["--study=cpu_collapse", "--workdir=w", "extra"], "extra"),
                        (["--study=cpu_collapse", "--workdir=w", "--seeds=a"], "--seeds=a")):
        assert runner.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, err


def test_a_reference_must_be_scored_by_one_of_the_evaluations():
    study = dataclasses.replace(load("cpu_collapse"), references={"pixels": ("eval_top5",)})
    with pytest.raises(ValueError, match=r"references \{'pixels': \('eval_top5',\)\}"):
        runner.plan(study, "w")


QUICK_STUDY = '''
from byol_flax.studies.study import STUDIES, Row, Study


@STUDIES.register("quick_test_study")
def quick_test_study() -> Study:
    # The rows differ in a host-side key only, so the second reuses the first's compiled step.
    return Study(table="Quick", description="two rows", config="digits_cpu:data={data}",
                 evaluations=("eval_digits:knn,data={data}",), seeds=(0,), data="digits",
                 references={"random_init": ("eval_knn",)}, overrides={"monitor.every_steps": 0},
                 rows=(Row("byol", {}, 72.5),
                       Row("large_crops", {"augment.crop_area_min": 0.5}, None,
                           note="not in the paper")))
'''


@pytest.mark.slow
def test_runner_runs_a_study_and_writes_table_and_plot(tmp_path):
    (tmp_path / "quick_study.py").write_text(QUICK_STUDY)
    study = studies.with_smoke(studies.load_study(str(tmp_path / "quick_study.py")))
    studies.STUDIES.unregister("quick_test_study")
    summary = runner.run_study(study, tmp_path / "runs")
    rows = {r["row"]: r for r in summary["rows"]}
    assert set(rows) == {"byol", "large_crops"}
    for row in rows.values():
        assert 0 <= row["ours"]["eval_knn"]["mean"] <= 100
        assert row["collapsed"] in ("complete", "dimensional", "no")
        assert row["ours"]["collapse/projection_std_ratio"]["per_seed"]
    assert summary["random_init_reference"].keys() == {"random_init_eval_knn"}
    table = (tmp_path / "runs" / "summary.md").read_text()
    assert "| byol | 72.5 |" in table and "| large_crops | - |" in table
    assert (tmp_path / "runs" / "summary.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())["table"] == "Quick"
    # Re-running resumes: nothing is trained again, the same table comes out.
    again = runner.run_study(study, tmp_path / "runs")
    assert [r["ours"] for r in again["rows"]] == [r["ours"] for r in summary["rows"]]


def test_simclr_config_is_the_g5_baseline_on_the_300_epoch_base():
    from byol_flax.configs import byol_imagenet_300ep, simclr_imagenet_300ep  # noqa: PLC0415

    simclr, byol = (simclr_imagenet_300ep.get_config("r50x1"),
                    byol_imagenet_300ep.get_config("r50x1"))
    assert (simclr.model.predictor.kind, simclr.target.kind) == ("identity", "online")
    assert (simclr.loss.beta, simclr.loss.temperature) == (1.0, 0.1)
    assert (simclr.model.projector.hidden_size, simclr.model.projector.output_size) == (4096, 256)
    differing = {k for k, v in simclr.items() if v != byol[k]}
    assert differing == {"model", "target", "loss"}


def test_an_evaluation_option_that_changes_the_measure_names_its_directory():
    name = studies.eval_dir_name
    assert name("eval_digits:linear,data=/d,image_size=12,smoke=True") == "eval_linear"
    assert name("eval_digits:linear,data=/d,feature_norm=batchnorm") == "eval_linear_batchnorm"
    assert name("eval_imagenet:smoke=True") == "eval_imagenet"
    # The demo scores both encoders with the standardised probe, beside the paper's.
    study = demo.demo_study([demo.recipe_row("digits", "digits")])
    names = [name(e) for e in study.evaluations]
    assert names == ["eval_linear", "eval_knn", "eval_linear_batchnorm"]
    assert set(study.references["random_init"]) == set(names)
