"""Features extracted once: shared by the monitor evaluators of one step, cached on disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.data.pipeline import open_split
from byol_flax.evaluation import base, features
from byol_flax.evaluation.feature_cache import FeatureCache
from byol_flax.evaluation.monitor import Monitor, build_state_evaluators
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh
from byol_flax.train_state import create_train_state
from byol_flax.weights.encoder import PretrainedEncoder
from tests.helpers import tiny_config
from tests.test_knn import whole_bank_predict


class EncoderWithHead(nnx.Module):
    """The previous online-classifier subject: images -> logits in one pass."""

    def __init__(self, encoder, head):
        self.encoder, self.head = encoder, head

    def __call__(self, images):
        return self.head(self.encoder(images))


K = (3, 20)  # monitor.knn_k: the larger one is clipped to nothing, a full vote over 40 rows
TEMPERATURE = 0.07


@pytest.fixture(scope="module")
def monitored(data_dir):
    """(config, graphdef, state): a tiny model at 8 px, 40 memory rows and 16 queries in batches
    of 16 (two rows per host CPU device), data read in-process (no Grain workers)."""
    config = tiny_config(batch_size=16)
    config.data.dir, config.data.image_size, config.data.worker_count = data_dir, 8, 0
    config.monitor.every_steps, config.monitor.batch_size = 1, 16
    config.monitor.max_train_examples, config.monitor.max_eval_examples = 40, 16
    config.monitor.knn_k, config.monitor.knn_temperature = K, TEMPERATURE
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


def test_one_encoder_pass_per_split_and_step_with_the_previous_scalars(monitored,
                                                                        monkeypatch):
    config, graphdef, state = monitored
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
    bank, bank_labels = ctx.features(ctx.train, limit=ctx.train_limit)
    queries, query_labels = ctx.features(ctx.test, limit=ctx.eval_limit)
    assert (len(bank), len(queries)) == (40, 16)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    for k in K:
        predicted = whole_bank_predict(jnp.asarray(unit(bank)), jnp.asarray(bank_labels),
                                       jnp.asarray(unit(queries)), k=k,
                                       temperature=TEMPERATURE, num_classes=10)[0]
        assert scalars[f"knn/top1_k{k}"] == float(np.mean(predicted == query_labels))
    online = ctx.classifier_scores(EncoderWithHead(live.online.encoder, live.classifier),
                                   ctx.test)
    assert {k: scalars[f"online_classifier/{k}"] for k in online} == online


def test_a_failing_evaluator_still_leaves_the_shared_features_to_the_next(monitored,
                                                                          monkeypatch):
    config, graphdef, state = monitored
    (knn, online) = build_state_evaluators(config, make_mesh(), graphdef)

    class Broken:
        name = "broken"

        def run(self, state):
            raise RuntimeError("monitor bug")

    passes = count_passes(monkeypatch)
    watch = Monitor([knn, Broken(), online], config, total_steps=2,
                    termination=TerminationGuard(enabled=False))
    scalars = watch.maybe_run(1, state)
    assert scalars["monitor_errors/broken"] == 1.0
    assert {"knn/top1_k3", "online_classifier/top1"} <= set(scalars)
    assert sorted(passes) == ["holdout", "train"]


def test_the_disk_cache_reuses_features_and_recomputes_a_stale_entry(monitored, tmp_path,
                                                                     monkeypatch):
    config, graphdef, state = monitored
    mesh = make_mesh()
    evaluation = build_state_evaluators(config, mesh, graphdef)[0]._evaluator._config  # noqa: SLF001
    encoder = nnx.merge(graphdef, state).online.encoder
    opened = open_split(evaluation.data, "holdout")
    passes = []  # encoder passes over the images, cached or not
    real_rows = features._feature_rows
    monkeypatch.setattr(features, "_feature_rows",
                        lambda *a, **k: passes.append(1) or real_rows(*a, **k))

    def extract(cache, identity="a", module=encoder):
        return features.FeatureStore(cache).features(module, opened, evaluation, mesh,
                                                     identity=identity, limit=16)

    in_memory = extract(None)
    cache = FeatureCache(tmp_path / "features")
    first = extract(cache)
    assert isinstance(first[0], np.memmap) and not first[0].flags.writeable
    np.testing.assert_array_equal(first[0], in_memory[0])
    np.testing.assert_array_equal(first[1], in_memory[1])
    assert len(passes) == 2
    # Another store (another protocol, a re-run) of the same weights reads the file.
    again = extract(cache, identity="b")
    np.testing.assert_array_equal(again[0], in_memory[0])
    np.testing.assert_array_equal(again[1], in_memory[1])
    assert len(passes) == 2
    # A sidecar that disagrees with its file: the entry is recomputed and rewritten.
    (sidecar,) = (tmp_path / "features").glob("*.json")
    sidecar.write_text(sidecar.read_text().replace('"dtype": "float32"', '"dtype": "float16"'))
    redone = extract(cache)
    np.testing.assert_array_equal(redone[0], in_memory[0])
    assert len(passes) == 3 and '"dtype": "float32"' in sidecar.read_text()
    extract(cache)
    assert len(passes) == 3  # the rewritten entry is read again
    # Altered bytes (rows permuted, say) that the sidecar still describes: its checksum tells.
    (entry,) = (tmp_path / "features").glob("*.features.npy")
    data = bytearray(entry.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    entry.write_bytes(bytes(data))
    np.testing.assert_array_equal(extract(cache)[0], in_memory[0])
    assert len(passes) == 4
    # A link planted where the next entry is written is removed, never written through.
    victim = tmp_path / "users_file.txt"
    victim.write_text("mine")
    (tmp_path / "features" / (entry.name + ".partial.npy")).symlink_to(victim)
    # Other weights: another fingerprint; the split's entry is replaced, not added to.
    module_def, params, rest = nnx.split(encoder, nnx.Param, ...)
    other = nnx.merge(module_def, jax.tree.map(lambda x: x * 1.5, params), rest)
    changed = extract(cache, module=other)
    assert len(passes) == 5 and len(list((tmp_path / "features").glob("*.json"))) == 1
    assert len(list((tmp_path / "features").iterdir())) == 3  # features, labels, sidecar
    assert not np.array_equal(changed[0], in_memory[0]) and victim.read_text() == "mine"
    extract(cache, module=other)
    assert len(passes) == 5


def test_the_commands_context_reads_features_through_its_disk_cache(monitored, tmp_path,
                                                                     monkeypatch):
    """The evaluation command's store (runner: ``features_cache``) serves ``Context.features``;
    a later command on the same workdir (a re-run, another protocol) reads the features from
    disk without an encoder pass, equal to an uncached extraction."""
    config, graphdef, state = monitored
    mesh = make_mesh()
    evaluation = build_state_evaluators(config, mesh, graphdef)[0]._evaluator._config  # noqa: SLF001
    subject = PretrainedEncoder(nnx.merge(graphdef, state).online.encoder, {},
                                {"kind": "training"})
    passes = []
    real_rows = features._feature_rows
    monkeypatch.setattr(features, "_feature_rows",
                        lambda *a, **k: passes.append(1) or real_rows(*a, **k))

    def context(store):
        return base.Context(evaluation, subject, mesh, store, "subject")

    uncached = context(base.SweepStore(None))
    expected = uncached.features(uncached.test, limit=16)
    cached = lambda: context(base.SweepStore(None, features=features.FeatureStore(
        FeatureCache(tmp_path / "features"))))
    first = cached()
    np.testing.assert_array_equal(first.features(first.test, limit=16)[0], expected[0])
    before = len(passes)
    again = cached()
    got = again.features(again.test, limit=16)
    assert len(passes) == before  # read from disk
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
