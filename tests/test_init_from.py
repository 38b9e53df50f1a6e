"""Pre-training from an export (``config.model.init_from``).

At step 0 the online encoder (and the heads, when the export kept them) are the export's, the
target is their copy, the optimizer state fresh; a short run on the digits through the real
``train_and_evaluate`` trains and checkpoints from step 0 and records the export; a resume
ignores ``init_from`` (even a checkpoint whose config predates the key); a mismatched export is
refused in one line naming the keys, before the data is opened."""

import functools
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks.reliability_processes import committed_steps, final_state
from byol_flax.checkpointing import config_changes, flatten_dotted
from byol_flax.config import ConfigError
from byol_flax.export.encoder import export_encoder
from byol_flax.init_from import InitFromError, apply_init_from, check_init_from
from byol_flax.models.byol import build_online_network
from byol_flax.models.encoders import ENCODERS
from byol_flax.models.resnet import ResNet
from byol_flax.weights.checkpoint import read_encoder
from byol_flax.weights.encoder import PretrainedEncoder, fingerprint, load_export
from tests.helpers import tiny_config
from tests.test_performance import shrunk_digits_config
from tests.test_train_driver import data_dir  # noqa: F401 (a fixture: the digits, converted)

NUM_CLASSES = 10
TOTAL_STEPS = 4  # 64 examples per epoch at batch 16, one epoch; checkpoints at 2 and 4


def pure(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module))


def assert_trees_equal(got, expected) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


# A two-block ResNet (stem, two basic blocks): the run's train step compiles in half the time
# of resnet_tiny's; nothing here depends on the depth.
ENCODER = "resnet_init_from_test"


@pytest.fixture(scope="module", autouse=True)
def small_encoder():
    ENCODERS.register(ENCODER)(functools.partial(
        ResNet, blocks_per_stage=(1, 1), stage_channels=(8, 16), bottleneck=False,
        stem_channels=8))
    yield
    ENCODERS.unregister(ENCODER)


def run_config(data_dir: str = "unused", init_from: str = ""):
    """digits_cpu shrunk as the driver tests shrink it (batch 16, 32-16 heads), on the small
    encoder, 4 steps."""
    config = shrunk_digits_config(data_dir)
    config.model.encoder.name, config.model.encoder.width_multiplier = ENCODER, 1
    config.training.epochs, config.training.warmup_epochs = 1.0, 0.5
    config.checkpoint.every_steps = config.logging.every_steps = 2
    config.model.init_from = init_from
    return config


def _random_arrays(module, rng: np.random.Generator) -> None:
    """Fills a module (possibly shape-only) with random arrays of plausible scale: every array,
    BatchNorm statistics included, differs from any initialisation."""

    def draw(path, x):
        name = str(path[-1].key)
        noise = rng.normal(size=x.shape)
        value = {"kernel": noise / np.sqrt(max(np.prod(x.shape[:-1]), 1)),
                 "scale": 1.0 + 0.1 * noise, "var": rng.uniform(0.5, 1.5, size=x.shape)}.get(
                     name, 0.1 * noise)
        return jax.numpy.asarray(value, dtype=x.dtype)

    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        draw, nnx.to_pure_dict(state)))
    nnx.update(module, state)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, PretrainedEncoder]:
    """Two exports of one random network of the run's architecture (nothing compiled): with
    heads (projector, predictor, classifier) and without; by their directory."""
    model = run_config().model
    network = nnx.eval_shape(lambda: build_online_network(model, rngs=nnx.Rngs(0)))
    classifier = nnx.eval_shape(lambda: nnx.Linear(network.encoder.num_features, NUM_CLASSES,
                                                   rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(7)
    for module in (network, classifier):
        _random_arrays(module, rng)
    model_config, origin = json.loads(model.to_json()), {"kind": "random", "path": "tests"}
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, heads in (("with_heads", {"projector": network.projector,
                                        "predictor": network.predictor,
                                        "classifier": classifier}),
                        ("encoder_only", {})):
        pretrained = PretrainedEncoder(network.encoder, model_config, origin, **heads)
        out[str(export_encoder(pretrained, root / name))] = pretrained
    return out


def export_dir(exports, name: str) -> str:
    (path,) = [path for path in exports if path.endswith(f"/{name}")]
    return path


# --- A real run on the digits, and its state at step 0 --------------------------------------


@pytest.fixture(scope="module")
def run_from_export(data_dir, exports, tmp_path_factory):
    """4 steps of the real training loop (on one of the tests' 8 CPU devices, as a user's CPU
    run is) started from the export with heads; the state is captured just before and just
    after ``init_from`` is applied (host copies: the loop donates the device buffers)."""
    from byol_flax import sharding, train

    captured = {}

    def spy(state, source):
        graphdef, arrays = nnx.split(state)
        captured["graphdef"], captured["before"] = graphdef, jax.tree.map(np.array, arrays)
        provenance = apply_init_from(state, source)
        captured["after"] = jax.tree.map(np.array, nnx.state(state))
        return provenance

    workdir = tmp_path_factory.mktemp("from_export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_mesh", lambda: sharding.make_mesh(jax.devices()[:1]))
        patch.setattr(train, "apply_init_from", spy)
        config = run_config(data_dir, export_dir(exports, "with_heads"))
        scalars = train.train_and_evaluate(config, workdir)
        assert np.isfinite(scalars["loss"])
        yield workdir, captured


@pytest.mark.parametrize("export,with_heads", [("with_heads", True), ("encoder_only", True),
                                               ("with_heads", False)])
def test_step_0_holds_the_export_and_a_fresh_optimizer(run_from_export, exports, export,
                                                       with_heads, caplog):
    """On the run's own new state: applied by the loop (with heads), and again on a copy of
    the state it built for the other cases."""
    _, captured = run_from_export
    config = run_config(init_from=export_dir(exports, export))
    config.model.init_from_heads = with_heads
    state = nnx.merge(captured["graphdef"], jax.tree.map(np.array, captured["before"]))
    before = nnx.to_pure_dict(captured["before"])
    with caplog.at_level(logging.INFO):
        provenance = apply_init_from(state, check_init_from(config))
    exported = exports[config.model.init_from]

    assert not np.array_equal(before["online"]["encoder"]["stem_norm"]["mean"],
                              pure(exported.encoder)["stem_norm"]["mean"])  # it can fail
    assert_trees_equal(pure(state.online.encoder), pure(exported.encoder))
    loaded = export == "with_heads" and with_heads
    for head in ("projector", "predictor"):
        expected = pure(getattr(exported, head)) if loaded else before["online"][head]
        assert_trees_equal(pure(getattr(state.online, head)), expected)
    # The target is the copy of the loaded online encoder and projector (weights and BN stats).
    assert_trees_equal(pure(state.target), pure(state.online_without_predictor()))
    # The online classifier, the optimizer state (momentum, counts) and the step start fresh.
    assert_trees_equal(pure(state.classifier), before["classifier"])
    assert int(state.step) == 0
    assert all(not np.any(x) for x in jax.tree.leaves(pure(state.optimizer)))
    assert_trees_equal(pure(state.optimizer), before["optimizer"])
    if loaded:  # what the training loop started from
        assert_trees_equal(nnx.to_pure_dict(captured["after"]), pure(state))

    assert provenance["fingerprint"] == fingerprint(exported.encoder)
    assert provenance["heads"] == (["projector", "predictor"] if loaded else [])
    (line,) = [r.getMessage() for r in caplog.records
               if "starting from the export" in r.getMessage()]
    assert provenance["fingerprint"] in line
    assert ("from random init" in line) == (not loaded), line
    if not loaded:
        assert ("model.init_from_heads=False" if export == "with_heads"
                else "not kept by the export") in line


def test_a_run_from_an_export_trains_from_step_0_and_records_the_export(run_from_export,
                                                                        exports):
    workdir, captured = run_from_export
    path = export_dir(exports, "with_heads")
    assert committed_steps(workdir) == [2, 4]
    state, position, _ = final_state(workdir)
    assert int(state["/optimizer/step"]) == TOTAL_STEPS and position == TOTAL_STEPS * 16
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert logged == [2, 4]
    # Trained from the export: after 2 small warm-up steps the kernels are near the export's,
    # far from the initialisation the config built.
    trained = read_encoder(workdir, step=2)

    def distance(reference):
        ours, theirs = flatten_dotted(trained.arrays), flatten_dotted(reference)
        return sum(float(np.sum((np.asarray(ours[k]) - np.asarray(theirs[k])) ** 2))
                   for k in theirs if k.endswith(".kernel"))

    initial = nnx.to_pure_dict(captured["before"])["online"]["encoder"]
    assert distance(pure(exports[path].encoder)) < 0.01 * distance(initial)
    # Provenance: the config names the export; the history (and so the model card) has its
    # fingerprint at step 0.
    assert json.loads((workdir / "config.json").read_text())["model"]["init_from"] == path
    (entry,) = [e for e in trained.pretrain_config["config_history"] if e["kind"] == "init"]
    assert entry["step"] == 0 and entry["key"] == "model.init_from"
    assert entry["new"]["path"] == path and entry["new"]["heads"] == ["projector", "predictor"]
    assert entry["new"]["fingerprint"] == load_export(path).origin["fingerprint"]


# --- Refusals ---------------------------------------------------------------------------------


def refusal(config) -> str:
    with pytest.raises(InitFromError) as caught:
        check_init_from(config)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config.model.init_from=")
    return message


def test_missing_directory_and_non_exports_are_refused_naming_the_key(tmp_path):
    assert issubclass(InitFromError, ConfigError)  # the CLI prints it as one line, no traceback
    missing = tmp_path / "nowhere"
    assert f"init_from={str(missing)!r}: no such directory" in refusal(
        run_config(init_from=str(missing)))
    (tmp_path / "plain").mkdir()
    assert "is not an encoder export: encoder_config.json missing" in refusal(
        run_config(init_from=str(tmp_path / "plain")))


def test_another_encoder_architecture_is_refused_listing_each_key(exports):
    config = run_config(init_from=export_dir(exports, "with_heads"))
    config.model.encoder.width_multiplier = 2
    config.model.batchnorm.eps = 1e-3
    message = refusal(config)
    assert "model.encoder.width_multiplier: export 1, config 2" in message
    assert "model.batchnorm.eps: export 1e-05, config 0.001" in message
    assert "stem" not in message


def test_heads_of_other_shapes_are_refused_unless_left_out(exports):
    config = run_config(init_from=export_dir(exports, "with_heads"))
    config.model.predictor.kind = "linear"
    message = refusal(config)
    assert "predictor (model.predictor.kind: export 'mlp', config 'linear')" in message
    assert "projector (" not in message
    assert "model.init_from_heads=False" in message
    config.model.predictor.kind = "mlp"
    config.model.projector.output_size = 8  # the projection is the predictor's input and output
    assert ("projector (model.projector.output_size: export 16, config 8), predictor "
            "(model.projector.output_size: export 16, config 8)") in refusal(config)
    config.model.init_from_heads = False
    source = check_init_from(config)
    assert source.kept == ("projector", "predictor") and source.heads == ()
    # An export without heads has nothing to mismatch.
    config.model.init_from, config.model.init_from_heads = export_dir(exports, "encoder_only"), True
    assert check_init_from(config).heads == ()


def test_the_export_is_checked_before_the_data_is_opened(exports, tmp_path):
    from byol_flax import train

    config = run_config(str(tmp_path / "no_data"), init_from=export_dir(exports, "with_heads"))
    config.model.encoder.stem = "imagenet"
    with pytest.raises(InitFromError, match="model.encoder.stem: export 'small', config"):
        train.train_and_evaluate(config, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()  # nothing written, no lease taken


# --- Resume -----------------------------------------------------------------------------------


def test_init_keys_are_init_only_on_resume_even_for_configs_that_predate_them():
    old = json.loads(tiny_config().to_json_best_effort())
    for key in ("init_from", "init_from_heads"):
        del old["model"][key]  # a run record written before the keys existed
    current = tiny_config()
    current.model.init_from, current.model.init_from_heads = "/exports/r50", False
    changes = config_changes.check_resume(
        {"config": old, "data": {"manifest_sha256": "a" * 64}},
        config_changes.run_record(current.to_json_best_effort(), "a" * 64), step=3, where="W")
    assert {c["key"]: c["kind"] for c in changes} == {"model.init_from": "runtime",
                                                      "model.init_from_heads": "runtime"}


def test_a_resume_ignores_init_from_and_continues_exactly(run_from_export, data_dir, tmp_path,
                                                         caplog):
    """Resumed at step 2 with init_from pointing nowhere and init_from_heads changed, from a
    checkpoint whose saved config predates both keys: the same step 4 as the run itself."""
    from byol_flax import train

    original, _ = run_from_export
    workdir = tmp_path / "resumed"
    shutil.copytree(original, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    record_file = workdir / "checkpoints" / "2" / "config" / "metadata"
    record = json.loads(record_file.read_text())
    for key in ("init_from", "init_from_heads"):
        del record["config"]["model"][key]  # as a checkpoint of an older version saved it
    record_file.write_text(json.dumps(record))
    config = run_config(data_dir, init_from=str(tmp_path / "gone"))
    config.model.init_from_heads = False
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, workdir)
    messages = [r.getMessage() for r in caplog.records]
    assert any("init_from=" in m and "not applied: resumed at step 2" in m for m in messages)
    assert not any("starting from the export" in m for m in messages)
    got, expected = final_state(workdir), final_state(original)
    assert got[0].keys() == expected[0].keys() and got[1:] == expected[1:]
    for name in expected[0]:
        np.testing.assert_array_equal(got[0][name], expected[0][name], err_msg=name)
    history = config_changes.read_history(workdir)
    assert [e["kind"] for e in history if e["key"] == "model.init_from"] == ["init", "runtime"]
