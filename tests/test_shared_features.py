"""Features extracted once: shared by the monitor evaluators of one step, cached on disk."""

import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.data.convert import digits
from byol_flax.data.pipeline import open_split
from byol_flax.evaluation import base, features
from byol_flax.evaluation import classifier as clf
from byol_flax.evaluation.feature_cache import FeatureCache
from byol_flax.evaluation.monitor import Monitor, build_state_evaluators
from byol_flax.evaluation.online_classifier import _EncoderWithHead
from byol_flax.export.encoder import PretrainedEncoder
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh
from byol_flax.train_state import create_train_state
from tests.helpers import tiny_config
from tests.test_knn import whole_bank_predict


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    assert digits.main(["--out", str(out), "--holdout-count", "100", "--no-progress"]) == 0
    return str(out)


def monitored(data_dir):
    config = tiny_config(batch_size=16)
    config.data.dir, config.data.image_size = data_dir, 8
    config.monitor.every_steps, config.monitor.batch_size = 1, 64
    config.monitor.max_train_examples, config.monitor.max_eval_examples = 160, 64
    config.monitor.evaluators = ("knn", "online_classifier")
    state = create_train_state(config, build_schedules(config, total_steps=10,
                                                       warmup_steps=1)[0], num_classes=10)
    return config, *nnx.split(state)


def count_passes(monkeypatch):
    passes = []
    real = features.extract_features

    def counted(embed, weights, opened, *args, **kwargs):
        passes.append(opened.split)
        return real(embed, weights, opened, *args, **kwargs)

    monkeypatch.setattr(features, "extract_features", counted)
    monkeypatch.setattr(base, "extract_features", counted)
    return passes


def test_one_encoder_pass_per_split_and_step_with_the_previous_scalars(data_dir, monkeypatch):
    config, graphdef, state = monitored(data_dir)
    mesh = make_mesh()
    evaluators = build_state_evaluators(config, mesh, graphdef)
    passes = count_passes(monkeypatch)
    watch = Monitor(evaluators, config, total_steps=2, termination=TerminationGuard(enabled=False))
    scalars = watch.maybe_run(1, state)
    assert sorted(passes) == ["holdout", "train"]  # kNN's memory and queries; no second holdout
    watch.maybe_run(2, state)
    assert len(passes) == 4  # a new step: its encoder is another, nothing is carried over

    # The previous implementation: kNN on the whole bank, the classifier fused with the encoder.
    live = nnx.merge(graphdef, state)
    knn_config = evaluators[0]._evaluator._config  # noqa: SLF001 - the monitor's own config
    subject = PretrainedEncoder(live.online.encoder, {}, {"kind": "training"},
                                classifier=live.classifier)
    ctx = base.Context(knn_config, subject, mesh, base.SweepStore(None), "x")
    bank, bank_labels = ctx.features(ctx.train, limit=160)
    queries, query_labels = ctx.features(ctx.test, limit=64)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    for k in (20, 200):
        predicted = whole_bank_predict(unit(bank), bank_labels, unit(queries), k=k,
                                       temperature=0.07, num_classes=10)[0]
        assert scalars[f"knn/top1_k{k}"] == float(np.mean(predicted == query_labels))
    online = ctx.classifier_scores(_EncoderWithHead(live.online.encoder, live.classifier),
                                   ctx.test)
    assert {k: scalars[f"online_classifier/{k}"] for k in online} == online


def test_a_failing_evaluator_still_leaves_the_shared_features_to_the_next(data_dir, monkeypatch):
    config, graphdef, state = monitored(data_dir)
    (knn, online) = build_state_evaluators(config, make_mesh(), graphdef)

    class Broken:
        name = "broken"

        def run(self, state):
            raise RuntimeError("monitor bug")

    passes = count_passes(monkeypatch)
    watch = Monitor([knn, Broken(), online], config, total_steps=2,
                    termination=TerminationGuard(enabled=False))
    scalars = watch.maybe_run(1, state)
    assert scalars["monitor_errors/broken"] == 1.0 and "online_classifier/top1" in scalars
    assert sorted(passes) == ["holdout", "train"]


def test_the_disk_cache_reuses_features_and_recomputes_a_stale_entry(data_dir, tmp_path,
                                                                     monkeypatch):
    config, graphdef, state = monitored(data_dir)
    evaluation = build_state_evaluators(config, make_mesh(), graphdef)[0]._evaluator._config  # noqa: SLF001
    encoder = nnx.merge(graphdef, state).online.encoder
    opened = open_split(evaluation.data, "holdout")
    mesh = make_mesh()
    passes = count_passes(monkeypatch)
    in_memory = features.FeatureStore().features(encoder, opened, evaluation, mesh,
                                                 identity="a", limit=50)
    cache = FeatureCache(tmp_path / "features")
    first = features.FeatureStore(cache).features(encoder, opened, evaluation, mesh,
                                                  identity="a", limit=50)
    assert isinstance(first[0], np.memmap) and not first[0].flags.writeable
    np.testing.assert_array_equal(first[0], in_memory[0])
    np.testing.assert_array_equal(first[1], in_memory[1])
    # Another store (another protocol, a re-run) of the same weights reads the file.
    apply, weights = clf.make_inference_fn(encoder, mesh)
    rows = []
    monkeypatch.setattr(features, "_feature_rows", lambda *a, **k: rows.append(1) or iter(()))
    again = features.FeatureStore(cache).features(encoder, opened, evaluation, mesh,
                                                  identity="b", limit=50)
    np.testing.assert_array_equal(again[0], in_memory[0])
    assert rows == []
    monkeypatch.undo()
    # Other weights, another entry; a sidecar that disagrees with its file is not read.
    sidecars = sorted((tmp_path / "features").glob("*.json"))
    assert len(sidecars) == 1
    sidecars[0].write_text(sidecars[0].read_text().replace('"dtype": "float32"',
                                                           '"dtype": "float16"'))
    key = {"encoder": {"fingerprint": "f"}}
    assert cache.load(key, opened) is None
    redone = features.FeatureStore(cache).features(encoder, opened, evaluation, mesh,
                                                   identity="a", limit=50)
    np.testing.assert_array_equal(redone[0], in_memory[0])
    assert len(passes) == 2 + 1  # in memory, first write, the rewrite after the stale sidecar
    del apply, weights
