"""CONTRIBUTING.md's "Adding a component" examples run as written: each block starting
``# example: <kind>`` is executed, and the component it registers is then used the way its
config entry uses it (and unregistered again)."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from byol_flax.config import validate_config
from byol_flax.models.encoders import ENCODERS, build_encoder
from byol_flax.models.predictors import PREDICTORS
from tests.helpers import tiny_config

GUIDE = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def example(kind: str) -> dict:
    """Executes the guide's example of ``kind``; returns its namespace."""
    blocks = dict(re.findall(r"```python\n\s*# example: (\w+)\n(.*?)```", GUIDE.read_text(),
                             flags=re.S))
    assert kind in blocks, f"CONTRIBUTING.md has no '# example: {kind}' block"
    code = "\n".join(line[3:] if line.startswith("   ") else line
                     for line in blocks[kind].splitlines())
    namespace: dict = {}
    exec(compile(code, f"CONTRIBUTING.md ({kind})", "exec"), namespace)  # noqa: S102 - our guide
    return namespace


def count_params(name: str, **options) -> int:
    module = nnx.eval_shape(lambda: build_encoder(name, rngs=nnx.Rngs(0), **options))
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_the_encoder_example_is_selected_by_its_config_entry():
    example("encoder")
    try:
        config = tiny_config()
        config.model.encoder.name = "resnet26"
        config.data.dir = "/data/is/not/read/here"
        validate_config(config, num_devices=8)
        encoder = nnx.eval_shape(lambda: build_encoder("resnet26", rngs=nnx.Rngs(0),
                                                       zero_init_residual=True))
        assert encoder.num_features == 2048
        # Two bottleneck blocks per stage: between ResNet-18's size and ResNet-50's (3, 4, 6, 3).
        assert count_params("resnet18") < count_params("resnet26") < count_params("resnet50")
    finally:
        ENCODERS.unregister("resnet26")


def test_the_predictor_example_trains_under_the_online_predictor():
    from tests.test_variants import FlatEncoder, params_of, run_steps, small_config  # noqa: PLC0415

    example("predictor")
    ENCODERS.register("test_flat_contributing")(FlatEncoder)
    try:
        config = small_config()
        config.model.encoder.name = "test_flat_contributing"
        config.model.predictor.kind = "layernorm_mlp"
        before, after, metrics = run_steps(config, steps=2)
        assert np.isfinite(float(metrics["loss"]))
        changed = {k for k, v in params_of(after.online.predictor).items()
                   if not np.array_equal(v, params_of(before.online.predictor)[k])}
        assert any("layers" in k and "scale" in k for k in changed), changed  # the LayerNorm
        assert params_of(after.target).keys().isdisjoint(params_of(after.online.predictor))
    finally:
        ENCODERS.unregister("test_flat_contributing")
        PREDICTORS.unregister("layernorm_mlp")


@pytest.mark.slow  # ~15 s: the guide's evaluator, end to end
def test_the_evaluator_example_runs_in_the_cli_and_as_a_monitor(tmp_path):
    from byol_flax.configs import eval_digits  # noqa: PLC0415
    from byol_flax.data.convert import digits  # noqa: PLC0415
    from byol_flax.evaluation import EVALUATORS, SweepStore, build_evaluator  # noqa: PLC0415
    from byol_flax.evaluation.config import validate_eval_config  # noqa: PLC0415
    from byol_flax.evaluation.monitor import build_state_evaluators  # noqa: PLC0415
    from byol_flax.schedules import build_schedules  # noqa: PLC0415
    from byol_flax.sharding import make_mesh  # noqa: PLC0415
    from byol_flax.train_state import create_train_state  # noqa: PLC0415
    from byol_flax.weights.encoder import PretrainedEncoder  # noqa: PLC0415

    data_dir = tmp_path / "digits"
    assert digits.main(["--out", str(data_dir), "--holdout-count", "100", "--no-progress"]) == 0
    example("evaluator")
    try:
        # As a training monitor on a live (untrained) state.
        config = tiny_config()
        config.data.dir, config.data.image_size = str(data_dir), 8
        config.monitor.every_steps, config.monitor.batch_size = 1, 64
        config.monitor.evaluators = ("nearest_class_mean",)
        state = create_train_state(config, build_schedules(config, total_steps=10,
                                                           warmup_steps=1)[0], num_classes=10)
        graphdef, live = nnx.split(state)
        (evaluator,) = build_state_evaluators(config, make_mesh(), graphdef)
        scalars = evaluator.run(live)
        assert set(scalars) == {"nearest_class_mean/top1"}
        assert scalars["nearest_class_mean/top1"] > 0.3  # 10 classes; random conv features

        # Through the evaluation CLI's path (config.protocol), on the same encoder: its
        # selection split is the monitor's split (holdout), so the scores are the same.
        evaluation = eval_digits.get_config(f"knn,data={data_dir}")
        evaluation.protocol = "nearest_class_mean"
        evaluation.data.image_size, evaluation.feature_batch_size = 8, 64
        validate_eval_config(evaluation, num_devices=jax.device_count())
        subject = PretrainedEncoder(state.online.encoder, {}, {"kind": "test"})
        result = build_evaluator(evaluation, make_mesh(),
                                 store=SweepStore(tmp_path / "sweep")).run(subject)
        assert result["protocol"] == "nearest_class_mean"
        assert result["selection"] == {"top1": scalars["nearest_class_mean/top1"]}
        assert 0.3 < result["test"]["top1"] <= 1.0
    finally:
        EVALUATORS.unregister("nearest_class_mean")


def test_the_study_example_prints_its_commands_by_name(capsys):
    from byol_flax.studies import runner, study  # noqa: PLC0415

    example("study")
    try:
        assert runner.main(["--study=predictor_depth_100ep", "--workdir=gs://B/depth",
                            "--set=data.dir=gs://B/imagenet",
                            "--eval_set=data.dir=gs://B/imagenet", "--print"]) == 0
        lines = capsys.readouterr().out.splitlines()
        pretrain = [line for line in lines if " byol_flax.main " in line]
        evaluate = [line for line in lines if " byol_flax.evaluation " in line]
        assert len(pretrain) == len(evaluate) == 3 * 3  # 3 rows x the study's 3 seeds
        assert all("--config.training.epochs=100.0" in line for line in pretrain)
        assert sum("--config.model.predictor.depth=2" in line for line in pretrain) == 3
        assert all("--config=byol_imagenet_300ep:r50x1" in line for line in pretrain)
    finally:
        study.STUDIES.unregister("predictor_depth_100ep")


def test_no_tracker_numbers_in_the_repository():
    """Code, tests and docs speak of topics, not of this project's tracker ("issue 17" means
    nothing to a reader of the repository); a public repository's issue may be cited by name."""
    root = GUIDE.parent
    files = [path for pattern in ("byol_flax/**/*.py", "tests/**/*.py", "benchmarks/**/*.py",
                                  "docs/**/*.md", "*.md")
             for path in root.glob(pattern)]
    cited = re.compile(r"\b(issue|task)s? #?\d+|\(issue\b|\bthe issue's\b", re.I)
    found = [f"{path.relative_to(root)}:{number}: {line.strip()}"
             for path in files if path.name != Path(__file__).name
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if cited.search(line) and "deepmind-research issue" not in line]
    assert not found, "\n".join(found)
