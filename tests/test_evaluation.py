"""The evaluation protocols (Appendix D.1, E.2, E.3), the encoder export and the model card."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from sklearn.linear_model import LogisticRegression

from byol_flax.checkpointing import Checkpointer
from byol_flax.config import ConfigError
from byol_flax.configs import digits_cpu, eval_digits, eval_imagenet, eval_transfer
from byol_flax.data.augment import normalize, photometric_augment
from byol_flax.data.convert import digits
from byol_flax.data.pipeline import labelled_dataset, open_split
from byol_flax.data.records import DataError
from byol_flax.evaluation import base, linear, semi_supervised, transfer_finetune
from byol_flax.evaluation import classifier as clf
from byol_flax.evaluation.config import eval_base_config, validate_eval_config
from byol_flax.evaluation.evaluators import build_evaluator
from byol_flax.evaluation.linear import linear_on_features
from byol_flax.evaluation.monitor import build_state_evaluators
from byol_flax.evaluation.runner import evaluate
from byol_flax.evaluation.transfer_linear import (
    fit_logistic_regression,
    l2_grid,
    logistic_objective,
    transfer_linear_on_features,
)
from byol_flax.export import model_card
from byol_flax.export.model_card import export_with_model_card as export_cli
from byol_flax.models import count_params, vit
from byol_flax.runtime import outputs
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh
from byol_flax.train_state import create_train_state
from byol_flax.weights import encoder as weights
from tests.helpers import tiny_config, tiny_vit_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    assert digits.main(["--out", str(out), "--holdout-count", "100", "--no-progress"]) == 0
    return str(out)


def tiny_eval_config(data_dir: str, protocol: str = "linear") -> ml_collections.ConfigDict:
    config = eval_digits.get_config(f"{protocol},data={data_dir}")
    config.data.image_size = 8
    config.feature_batch_size = 64
    return config


def tiny_model_config() -> dict:
    return json.loads(tiny_config().model.to_json())


# ----------------------------------------------------------------------------------------------
# Paper numbers and formulas.


def test_defaults_are_the_papers():
    config = eval_base_config()
    # Appendix D.1: linear evaluation.
    assert tuple(config.linear.learning_rates) == (0.4, 0.3, 0.2, 0.1, 0.05)
    assert (config.linear.epochs, config.linear.batch_size, config.linear.momentum) == (80, 1024,
                                                                                       0.9)
    assert config.linear.nesterov and not config.linear.tclip
    assert (config.linear.tclip_alpha, config.linear.tclip_beta) == (20.0, 1e-2)
    # Appendix D.1: semi-supervised.
    assert tuple(config.semi_supervised.learning_rates) == (0.01, 0.02, 0.05, 0.1, 0.005)
    assert tuple(config.semi_supervised.epochs) == (30, 50)
    # Appendix E.3: 20000 steps at batch 256; Appendix E.2 grid bounds.
    assert (config.transfer_finetune.steps, config.transfer_finetune.batch_size) == (20000, 256)
    assert (config.transfer_linear.l2_min, config.transfer_linear.l2_max) == (1e-6, 1e5)


def test_tclip_and_the_regularised_loss_match_appendix_d1():
    logits = np.array([[-100.0, -3.0, 0.5, 40.0], [1.0, 2.0, -1.0, 0.0]], np.float32)
    labels = np.array([3, 0])
    alpha, beta = 20.0, 1e-2
    clipped = alpha * np.tanh(logits / alpha)
    np.testing.assert_allclose(clf.tclip(jnp.asarray(logits), alpha), clipped, rtol=1e-6)
    assert np.all(np.abs(clipped) < alpha)
    log_softmax = clipped - np.log(np.exp(clipped).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(2), labels].mean() + beta * np.mean(clipped ** 2)
    got = clf.classification_loss(jnp.asarray(logits), jnp.asarray(labels), tclip_alpha=alpha,
                                  tclip_beta=beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = clf.classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert not np.isclose(plain, expected)


def test_l2_grid_has_45_log_spaced_values_in_range():
    cfg = eval_base_config().transfer_linear
    grid = l2_grid(cfg.l2_min, cfg.l2_max, cfg.l2_count)
    assert len(grid) == 45
    np.testing.assert_allclose([grid[0], grid[-1]], [1e-6, 1e5])
    np.testing.assert_allclose(np.diff(np.log10(grid)), 11 / 44)


def test_finetuning_grid_and_batchnorm_decay_match_appendix_e3():
    grid = transfer_finetune.finetune_grid(eval_base_config().transfer_finetune)
    rates = sorted({p["learning_rate"] for p in grid})
    decays = sorted({p["weight_decay"] for p in grid})
    assert len(grid) == 7 * 8 and len(rates) == 7 and len(decays) == 8
    np.testing.assert_allclose([rates[0], rates[-1]], [1e-4, 0.1])
    assert decays[0] == 0.0
    np.testing.assert_allclose([decays[1], decays[-1]], [1e-6, 1e-3])
    assert transfer_finetune.finetune_batchnorm_decay(5) == 0.9  # max(1 - 10/5, 0.9)
    assert transfer_finetune.finetune_batchnorm_decay(1000) == pytest.approx(0.99)


def test_logistic_regression_reaches_scikit_learns_optimum():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5))
    labels = rng.integers(0, 3, size=120)
    features = (centers[labels] + rng.normal(size=(120, 5))).astype(np.float32)
    for l2 in (1e-3, 1.0):
        params, _ = fit_logistic_regression(features, labels, num_classes=3, l2=l2,
                                            tolerance=1e-7)
        # Same objective up to the factor C n: C = 1 / (l2 n).
        reference = LogisticRegression(C=1 / (l2 * len(labels)), tol=1e-10, max_iter=10_000)
        reference.fit(features, labels)
        ref = {"kernel": reference.coef_.T.astype(np.float32),
               "bias": reference.intercept_.astype(np.float32)}
        ours, theirs = (float(logistic_objective(p, features, labels, l2)) for p in (params, ref))
        assert ours <= theirs + 1e-5
        np.testing.assert_array_equal(clf.linear_logits(params, features).argmax(1),
                                      reference.predict(features))


def test_accuracy_metrics():
    logits = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.0, 0.2, 0.8]])
    labels = np.array([0, 2, 1, 1])
    metrics = clf.accuracy_metrics(logits, labels)
    assert metrics["top1"] == 0.5
    assert metrics["top5"] == 1.0  # three classes: top-3
    assert metrics["mean_per_class"] == pytest.approx((1 + 0 + 1) / 3)


# ----------------------------------------------------------------------------------------------
# Subsets.


def test_label_fraction_subset_is_balanced_and_deterministic():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [400, 250, 200, 150])
    rng.shuffle(labels)
    subset = semi_supervised.balanced_subset(labels, 0.1, seed=3)
    counts = np.bincount(labels[subset], minlength=4)
    assert np.all(counts == 25)  # round(0.1 * 1000 / 4) of every class, whatever its size
    assert len(set(subset)) == len(subset) and np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, semi_supervised.balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, semi_supervised.balanced_subset(labels, 0.1, seed=4))


def test_subset_from_a_split_file_matches_ids_or_file_names(tmp_path):
    ids = ["n01/n01_1.JPEG", "n01/n01_2.JPEG", "n02/n02_7.JPEG"]
    listing = tmp_path / "1percent.txt"
    listing.write_text("n02_7.JPEG\nn01/n01_1.JPEG\n\n")
    np.testing.assert_array_equal(semi_supervised.subset_from_split_file(ids, str(listing)), [0, 2])
    listing.write_text("n01_1.JPEG\nn09_9.JPEG\n")
    with pytest.raises(DataError, match=r"1percent.txt: 1 of 2 .*n09_9.JPEG"):
        semi_supervised.subset_from_split_file(ids, str(listing))


# ----------------------------------------------------------------------------------------------
# Selection happens on the selection split, never on test.


def feature_context(tmp_path, config) -> base.Context:
    stub = weights.PretrainedEncoder(encoder=None, model_config={}, origin={"kind": "test"})
    ctx = base.Context(config, stub, make_mesh(), base.SweepStore(tmp_path), "test")
    ctx.num_classes = 2
    return ctx


def disagreeing_splits():
    """x0 separates the classes of train and selection; x1 only correlates with them, with a
    much larger mean gap. A barely trained classifier follows the class means (mostly x1); a
    trained one uses x0. Test flips the role of x0 only, so the two splits rank them oppositely."""
    rng = np.random.default_rng(0)

    def split(n, flip):
        y = rng.integers(0, 2, size=n).astype(np.int32)
        sign = np.where(y == 0, 1.0, -1.0)
        x0 = sign * rng.uniform(0.5, 1.0, size=n) * (-1.0 if flip else 1.0)
        x1 = sign * 5.0 + rng.normal(scale=8.0, size=n)
        return np.stack([x0, x1], axis=1).astype(np.float32), y

    return split(400, False), split(400, False), split(400, True)


def test_linear_sweep_selects_on_the_selection_split_not_on_test(tmp_path):
    config = eval_base_config()
    config.linear.epochs = 30.0
    config.linear.batch_size = 100
    train, selection, test = disagreeing_splits()
    ctx = feature_context(tmp_path, config)
    points = [{"learning_rate": lr} for lr in (1e-6, 0.5)]
    no_tclip = {"tclip_alpha": 0.0, "tclip_beta": 0.0}
    result = linear_on_features(ctx, train, selection, test, points, no_tclip)
    by_lr = {row["point"]["learning_rate"]: row["selection"]["top1"] for row in result["sweep"]}
    assert by_lr[0.5] > 0.95 > 0.85 > by_lr[1e-6]
    assert result["selected"] == {"learning_rate": 0.5}
    # What selecting on test would have picked instead: the barely trained classifier.
    untrained_on_test = linear_on_features(
        feature_context(tmp_path / "other", config), train, test, test, points[:1], no_tclip)
    assert result["test"]["top1"] < 0.3 < untrained_on_test["test"]["top1"]
    assert (result["selection_split"], result["test_split"]) == ("holdout", "test")


def test_transfer_linear_selects_l2_on_selection_and_refits_on_train_and_selection(tmp_path):
    config = eval_base_config()
    config.transfer_linear.l2_count = 3
    config.transfer_linear.l2_min = 1e-4
    config.transfer_linear.l2_max = 1e4
    train, selection, test = disagreeing_splits()
    ctx = feature_context(tmp_path, config)
    result = transfer_linear_on_features(ctx, train, selection, test)
    # l2 = 1e4 shrinks the kernel towards the class-mean direction (x1): ~0.7 on both splits.
    by_l2 = {row["point"]["l2"]: row["selection"]["top1"] for row in result["sweep"]}
    assert by_l2[1e-4] > 0.95 > 0.85 > by_l2[1e4]
    assert result["selected"]["l2"] in (1e-4, 1.0)
    assert result["test"]["top1"] < 0.3 and result["refit_on_train_and_selection"]
    # A re-run resumes from the stored sweep points and gives the same answer.
    again = transfer_linear_on_features(feature_context(tmp_path, config), train,
                                                  selection, test)
    assert again["selected"] == result["selected"] and again["test"] == result["test"]


# ----------------------------------------------------------------------------------------------
# Frozen encoder, export, CLI.


@pytest.mark.slow  # ~30 s: a whole linear evaluation
def test_linear_evaluation_leaves_the_encoder_bit_for_bit_unchanged(data_dir):
    config = tiny_eval_config(data_dir)
    encoder = weights.encoder_from_model_config(tiny_model_config(), seed=1)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(encoder)))
    opened = open_split(config.data, "train")
    aug = config.augment

    def augment(key, images):  # Table 7's variant: the pre-training augmentations T
        return normalize(photometric_augment(images, key, aug.view1, aug))

    results = {}
    for train_encoder in (False, True):
        model = clf.Classifier(nnx.clone(encoder), num_classes=10)
        batches = iter(labelled_dataset(config, opened, indices=None, batch_size=32,
                                        augment=True, seed=0))
        clf.train_classifier(model, batches, spec=clf.SgdSpec(total_steps=3),
                             learning_rate=0.5, train_encoder=train_encoder, mesh=make_mesh(),
                             seed=0, augment=augment)
        results[train_encoder] = model
    frozen = nnx.to_pure_dict(nnx.state(results[False].encoder))
    jax.tree.map(np.testing.assert_array_equal, before, frozen)  # weights and BN statistics
    assert np.any(np.asarray(results[False].head.kernel[...]) != 0)  # the head did train
    tuned = nnx.to_pure_dict(nnx.state(results[True].encoder))  # the check can fail:
    assert not np.array_equal(before["stem_norm"]["mean"], tuned["stem_norm"]["mean"])
    assert not np.array_equal(before["stem_conv"]["kernel"], tuned["stem_conv"]["kernel"])


@pytest.fixture(scope="module")
def pretraining_workdir(data_dir, tmp_path_factory):
    """A pre-training workdir as the driver leaves it: config.json and one checkpoint."""
    workdir = tmp_path_factory.mktemp("pretrain")
    config = digits_cpu.get_config(data_dir)
    config.model = tiny_config().model
    config.data.image_size = 8
    config.training.batch_size = 16
    lr, _ = build_schedules(config, total_steps=10, warmup_steps=1)
    state = nnx.state(create_train_state(config, lr))
    (workdir / "config.json").write_text(config.to_json_best_effort())
    checkpointer = Checkpointer(workdir / "checkpoints", config)
    checkpointer.save(7, state, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return workdir, state


def test_exported_encoder_reloads_with_identical_features_and_a_model_card(
        pretraining_workdir, tmp_path, data_dir):
    workdir, state = pretraining_workdir
    out = export_cli(str(workdir), str(tmp_path / "export"), intended_use="tests only")
    encoder = weights.load_encoder(out)
    encoder.eval()
    original = weights.load_pretraining_encoder(workdir).encoder
    original.eval()
    trained = state["online"]["encoder"]
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(trained),
                 nnx.to_pure_dict(nnx.state(encoder)))
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    np.testing.assert_array_equal(encoder(images), original(images))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["encoder", "encoder_config.json", "model_card.json", "MODEL_CARD.md",
         outputs.MARKER_NAME])

    card = model_card.read_model_card(out)
    assert card["checkpoint"]["step"] == 7
    assert card["architecture"]["encoder_parameters"] == count_params(encoder)
    assert card["pretraining_data"]["dataset"] == "digits"
    assert len(card["pretraining_data"]["manifest_sha256"]) == 64
    assert card["augmentations"]["view2"]["solarize_prob"] == 0.2
    assert card["intended_use"] == "tests only"
    assert card["out_of_scope_use"] == model_card.NOT_STATED
    assert card["training"]["epochs"] == pytest.approx(
        7 * 16 / card["pretraining_data"]["train_records"])
    assert "tests only" in (out / "MODEL_CARD.md").read_text()


def test_cli_evaluates_an_export_and_a_random_init_baseline(pretraining_workdir, tmp_path,
                                                            data_dir):
    workdir, _ = pretraining_workdir
    out = export_cli(str(workdir), str(tmp_path / "export"))
    # An export from someone else whose card is a link to a shell start-up file: evaluation
    # must not write through it (nor into the export at all).
    startup = tmp_path / "bashrc"
    startup.write_text("# the user's own\n")
    card_file = out / model_card.CARD_MARKDOWN
    real_card = card_file.read_text()
    card_file.unlink()
    os.symlink(startup, card_file)
    config = tiny_eval_config(data_dir)
    config.linear.learning_rates = (0.4, 0.1)
    config.linear.epochs = 5.0
    trained = evaluate(config, str(out), str(tmp_path / "linear"))
    assert startup.read_text() == "# the user's own\n"
    with pytest.raises(weights.SourceError, match="MODEL_CARD.md is a symbolic link"):
        model_card.add_results_to_card(out, [str(tmp_path / "linear")])
    assert startup.read_text() == "# the user's own\n"
    card_file.unlink()
    card_file.write_text(real_card)
    baseline = evaluate(config, f"random:{out}", str(tmp_path / "random"))
    for result in (trained, baseline):
        assert result["selection_split"] == "holdout" and result["test_split"] == "test"
        assert 0.0 <= result["test"]["top1"] <= 1.0
        assert len(result["sweep"]) == 2
    assert baseline["source"]["kind"] == "random"
    saved = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert saved["test"] == trained["test"]
    # Evaluation reads the export and writes nothing into it; the explicit command records it.
    assert model_card.read_model_card(out)["evaluations"] == []
    card = model_card.add_results_to_card(out, [str(tmp_path / "linear")])
    assert card == model_card.read_model_card(out)
    assert [e["source"]["kind"] for e in card["evaluations"]] == ["export"]
    assert "| linear | linear | top1 |" in (out / "MODEL_CARD.md").read_text()


def test_bad_evaluation_configs_are_named(tmp_path):
    config = eval_base_config()
    config.data.dir = str(tmp_path)
    config.data.selection_split = "test"
    with pytest.raises(ConfigError, match="data.selection_split='test'.*never chosen on test"):
        validate_eval_config(config, num_devices=1)
    config = eval_base_config()
    config.data.dir = str(tmp_path)
    config.linear.augment = "color"
    with pytest.raises(ConfigError, match="linear.augment='color'"):
        validate_eval_config(config, num_devices=1)
    with pytest.raises(AttributeError):
        config.linear.learning_rate = 0.1  # typo'd key: the config is locked
    with pytest.raises(weights.SourceError, match="neither encoder_config.json"):
        weights.load_source(str(tmp_path))


def test_experiment_modules_select_the_protocols():
    assert eval_imagenet.get_config("linear_table7").linear.augment == "pretrain"
    assert eval_imagenet.get_config("linear_table7").linear.tclip
    assert eval_imagenet.get_config("semi_1pct").semi_supervised.label_fraction == 0.01
    assert eval_imagenet.get_config("linear").data.test_split == "validation"
    aircraft = eval_transfer.get_config("linear,dataset=aircraft")
    assert (aircraft.protocol, aircraft.data.num_classes) == ("transfer_linear", 100)
    assert aircraft.transfer_linear.metric == "mean_per_class"  # Table 10
    assert eval_transfer.get_config("finetune,dataset=cifar10").protocol == "transfer_finetune"
    with pytest.raises(ValueError, match="dataset='mnist' is not one of"):
        eval_transfer.get_config("linear,dataset=mnist")


def test_stored_sweep_points_are_reused_only_for_the_same_config(tmp_path):
    config = eval_base_config()
    config.linear.epochs = 5.0
    config.linear.batch_size = 100
    train, selection, test = disagreeing_splits()
    points = [{"learning_rate": 0.5}]
    no_tclip = {"tclip_alpha": 0.0, "tclip_beta": 0.0}
    linear_on_features(feature_context(tmp_path, config), train, selection, test,
                                 points, no_tclip)
    linear_on_features(feature_context(tmp_path, config), train, selection, test,
                                 points, no_tclip)
    assert len(list(tmp_path.glob("*.json"))) == 1  # same config: resumed, not refitted
    config.linear.epochs = 6.0
    linear_on_features(feature_context(tmp_path, config), train, selection, test,
                                 points, no_tclip)
    assert len(list(tmp_path.glob("*.json"))) == 2  # another config: its own point


def test_a_diverging_sweep_point_loses_instead_of_stopping_the_sweep(tmp_path):
    ctx = feature_context(tmp_path, eval_base_config())
    calls = []

    def fit(point):
        calls.append(point)
        if point["learning_rate"] > 1:
            raise FloatingPointError("loss is nan")
        return point

    selected, _, rows = base.sweep(ctx, "toy", [{"learning_rate": 10.0},
                                                     {"learning_rate": 0.1}], fit,
                                        lambda model: {"top1": 0.5}, metric="top1")
    assert selected == {"learning_rate": 0.1} and rows[0]["selection"]["diverged"] == 1.0
    base.sweep(ctx, "toy", [{"learning_rate": 10.0}], fit, lambda m: {"top1": 0.5},
                    metric="top1")
    assert len(calls) == 2  # the diverged point is stored, not retried


@pytest.mark.slow  # ~10 s: two protocols end to end
def test_semi_supervised_and_finetuning_protocols_run_on_digits(data_dir, tmp_path):
    encoder = weights.PretrainedEncoder(
        weights.encoder_from_model_config(tiny_model_config(), seed=2), tiny_model_config(),
        {"kind": "random", "path": "tiny", "seed": 2})
    common = tiny_eval_config(data_dir)
    common.semi_supervised.learning_rates = (0.05,)
    common.semi_supervised.epochs = (1,)
    common.semi_supervised.batch_size = 64
    common.transfer_finetune.learning_rate_count = 1
    common.transfer_finetune.weight_decay_count = 1
    common.transfer_finetune.include_no_weight_decay = False
    common.transfer_finetune.steps = 2
    common.transfer_finetune.batch_size = 64
    mesh = make_mesh()
    semi = build_evaluator(_with_protocol(common, "semi_supervised"), mesh,
                           store=base.SweepStore(tmp_path)).run(encoder)
    num_train = open_split(common.data, "train").num_records
    assert semi["labelled_examples"] == 10 * round(0.1 * num_train / 10)  # balanced 10%
    assert semi["selected"] == {"learning_rate": 0.05, "epochs": 1}
    tuned = build_evaluator(_with_protocol(common, "transfer_finetune"), mesh,
                            store=base.SweepStore(tmp_path)).run(encoder)
    assert tuned["selected"] == {"learning_rate": 1e-4, "weight_decay": 1e-6}
    assert tuned["refit_on_train_and_selection"] and 0 <= tuned["test"]["top1"] <= 1


def _with_protocol(config, protocol):
    config = config.copy_and_resolve_references()
    config.protocol = protocol
    return config


# ----------------------------------------------------------------------------------------------
# One evaluator interface for the training monitor and the CLI.


@pytest.mark.slow  # ~17 s: the command and a training monitor
def test_a_monitor_and_the_cli_run_the_same_registered_evaluator(data_dir):
    """kNN and the online classifier as training monitors on a live state give exactly what
    the protocol code gives on the same encoder and splits."""
    config = tiny_config(batch_size=16)
    config.data.dir, config.data.image_size = data_dir, 8
    config.monitor.every_steps, config.monitor.batch_size = 1, 64
    config.monitor.max_train_examples, config.monitor.max_eval_examples = 200, 64
    config.monitor.evaluators = ("knn", "online_classifier")
    train_state = create_train_state(config, build_schedules(config, total_steps=10,
                                                             warmup_steps=1)[0], num_classes=10)
    graphdef, state = nnx.split(train_state)
    mesh = make_mesh()
    scalars = {}
    for evaluator in build_state_evaluators(config, mesh, graphdef):
        scalars.update(evaluator.run(state))
    assert set(scalars) >= {"knn/top1_k20", "knn/top1_k200", "online_classifier/top1"}

    evaluation = tiny_eval_config(data_dir, "knn")
    evaluation.data.selection_split = evaluation.data.test_split = "holdout"  # as the monitor
    evaluation.data.train_split = "train"
    evaluation.data.max_train_examples, evaluation.data.max_eval_examples = 200, 64
    evaluation.knn.k = (20, 200)
    subject = weights.PretrainedEncoder(nnx.merge(graphdef, state).online.encoder,
                                       tiny_model_config(), {"kind": "test"})
    knn = build_evaluator(evaluation, mesh).run(subject)
    assert knn["test"] == {"top1_k20": scalars["knn/top1_k20"],
                           "top1_k200": scalars["knn/top1_k200"]}

    evaluation.protocol = "online_classifier"
    merged = nnx.merge(graphdef, state)
    subject = weights.PretrainedEncoder(merged.online.encoder, tiny_model_config(),
                                       {"kind": "test"}, classifier=merged.classifier)
    online = build_evaluator(evaluation, mesh).run(subject)
    assert online["test"]["top1"] == scalars["online_classifier/top1"]
    with pytest.raises(weights.SourceError, match="no online classifier"):
        build_evaluator(evaluation, mesh).run(dataclasses.replace(subject, classifier=None))


# ----------------------------------------------------------------------------------------------
# linear.feature_norm: the standardised-feature probe beside the paper's.


def shared_component_splits():
    """Two classes told apart by x0 alone, on a small scale (0.05), under a large offset common
    to every example (as a ViT's class token carries) and beside eight uninformative features
    with a hundred times its spread: a classifier trained by SGD at the paper's learning rates
    follows the high-variance directions unless the features are standardised."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, size=n).astype(np.int32)
        x0 = np.where(y == 0, 1.0, -1.0) * 0.05 + rng.normal(scale=0.01, size=n)
        noise = rng.normal(scale=5.0, size=(n, 8))
        return (np.concatenate([x0[:, None], noise], axis=1) + 3.0).astype(np.float32), y

    return split(400), split(400), split(400)


class FixedFeatures(base.Context):
    """A protocol context whose splits' frozen features are given arrays."""

    def features(self, opened, *, limit=0, resize_ratio=1.0):
        return self.fixed[opened]


def fixed_context(tmp_path, config, splits) -> base.Context:
    stub = weights.PretrainedEncoder(encoder=None, model_config={}, origin={"kind": "test"})
    ctx = FixedFeatures(config, stub, make_mesh(), base.SweepStore(tmp_path), "test")
    ctx.fixed = dict(zip(("train", "selection", "test"), splits, strict=True))
    for name in ctx.fixed:  # the opened splits are the arrays' names
        ctx.__dict__[name] = name
    ctx.num_classes = 2
    return ctx


def test_feature_norm_standardises_with_the_training_splits_statistics_only(tmp_path):
    splits = shared_component_splits()
    config = eval_base_config()
    config.linear.augment = "none"
    config.linear.epochs = 20.0
    config.linear.batch_size = 100
    config.linear.learning_rates = (0.01, 0.001)
    top1 = {}
    for norm in ("none", "batchnorm"):
        config.linear.feature_norm = norm
        result = linear.run_linear(fixed_context(tmp_path / norm, config, splits))
        assert result["feature_norm"] == norm
        top1[norm] = result["test"]["top1"]
    assert top1["batchnorm"] > 0.95 and top1["none"] < 0.75
    # The statistics are the training split's: its features come out centred with unit
    # variance; another split's keep their own offset from the training mean.
    train, _, test = splits
    standardizer = linear.feature_standardizer(train[0])
    standardised = linear.standardize(train, standardizer)[0]
    np.testing.assert_allclose(standardised.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(standardised.std(axis=0), 1.0, rtol=1e-3)
    shifted = (test[0] + 1.0, test[1])
    np.testing.assert_allclose(linear.standardize(shifted, standardizer)[0].mean(axis=0),
                               (test[0] + 1.0 - train[0].mean(axis=0)).mean(axis=0)
                               * standardizer[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("train_it", [True, False])
def test_fine_tuning_trains_a_vits_frozen_patch_projection_unless_told_not_to(
        data_dir, tmp_path, train_it):
    """MoCo v3 freezes the random patch projection for pre-training and fine-tunes every
    parameter: so do the fine-tuning protocols (finetune_patch_projection), the position
    embedding staying fixed; the pre-trained encoder itself is untouched."""
    model_config = json.loads(tiny_vit_config(freeze_patch_projection=True).model.to_json())
    model_config["encoder"]["image_size"] = 8
    encoder = weights.encoder_from_model_config(model_config, seed=3)
    pretrained = weights.PretrainedEncoder(encoder, model_config, {"kind": "test"})
    config = tiny_eval_config(data_dir, "semi_supervised")
    config.finetune_patch_projection = train_it
    ctx = base.Context(config, pretrained, make_mesh(), base.SweepStore(tmp_path), "vit")
    before = np.array(encoder.patch_kernel[...])
    tuned = semi_supervised.fine_tune(
        ctx, ctx.train, None, learning_rate=0.5, weight_decay=0.0, steps=2, batch_size=32,
        section=config.semi_supervised, batchnorm_decay=0.9, unit=("test", {}))
    kernel = tuned.encoder.patch_kernel
    assert isinstance(kernel, nnx.Param) is train_it
    assert (not np.array_equal(before, kernel[...])) is train_it
    np.testing.assert_array_equal(tuned.encoder.position_embedding[...],
                                  encoder.position_embedding[...])
    assert isinstance(encoder.patch_kernel, vit.FrozenParam)  # the source stays as it was
    np.testing.assert_array_equal(encoder.patch_kernel[...], before)
