"""Importing the official BYOL release: the network it maps onto equals the official one.

The reference is a Haiku build of the official structure (google-deepmind/deepmind-research,
``byol/utils/networks.py`` and ``byol_experiment.py``): ``ResNetTorso`` = initial 7x7/2 conv
(SAME) + BatchNorm + ReLU + 3x3/2 max-pool (SAME), four ``hk.nets.ResNet.BlockGroup``s, mean
pool; ``MLP`` projector and predictor (Linear+bias, BatchNorm, ReLU, Linear without bias); a
linear ``classifier``; BatchNorm decay 0.9, eps 1e-5 (Appendix J.1). Its parameters, all
randomised, are written in the release's pickle layout (a protocol-2 pickle of
``dict(experiment_state=_ByolExperimentState(...), step, rng)`` with Haiku ``frozendict``
mappings), imported, and the outputs compared (BatchNorm in inference mode, float32).

The release was written by ``dill.dump(..., protocol=2)`` (its ``utils/checkpointing.py``), whose
bytes differ from plain ``pickle``'s: ``tests/fixtures/release_tiny_dill032.pkl`` is a tiny
network written by dill 0.3.2 of mid-2020 (``tests/fixtures/make_dill_release_fixture.py``), and
today's dill writes one here; both import to the Haiku network's outputs. The reader's refusals
of crafted files are ``tests/test_safe_pickle.py``.
"""

import hashlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

hk = pytest.importorskip("haiku", reason="dm-haiku (the dev extra) is the official reference")
from haiku._src import data_structures  # noqa: E402  (the release's frozendict)

from byol_flax.config import base_config  # noqa: E402
from byol_flax.models.byol import count_params  # noqa: E402
from byol_flax.weights import official  # noqa: E402
from byol_flax.weights.encoder import load_export, load_source  # noqa: E402

BN_CONFIG = {"decay_rate": 0.9, "eps": 1e-5, "create_scale": True, "create_offset": True}
# (blocks per group, bottleneck, channels per group, stem channels) of the official
# ResNet18/50/200, and of our resnet_tiny in the official structure.
OFFICIAL = {18: ((2, 2, 2, 2), False, (64, 128, 256, 512), 64),
            50: ((3, 4, 6, 3), True, (256, 512, 1024, 2048), 64),
            200: ((3, 24, 36, 3), True, (256, 512, 1024, 2048), 64),
            "_tiny": ((1, 1, 1, 1), False, (8, 16, 32, 64), 8)}
# The committed dill 0.3.2 file (tests/fixtures/make_dill_release_fixture.py wrote it).
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "release_tiny_dill032.pkl"
FIXTURE_SEED = 20200613
FIXTURE_SIZES = {"depth": "_tiny", "hidden": 16, "output": 8, "num_classes": 5}


def official_encoder(name: str, width: int) -> dict:
    """config.model.encoder of an imported release: the ResNet with the ImageNet stem, the other
    keys (ViT options, the 224-px image size) at their defaults."""
    encoder = base_config().model.encoder.to_dict()
    encoder.update(name=name, width_multiplier=width, stem="imagenet", zero_init_residual=False)
    return encoder


def official_forward(images, *, depth, width, hidden, output, num_classes, is_training):
    """The official online network's forward pass (``_forward``'s ``apply_once_fn``)."""
    blocks, bottleneck, channels, stem_channels = OFFICIAL[depth]

    class Torso(hk.Module):
        """Sub-modules made in the constructor, as ``ResNetTorso`` does: their names join with
        ``/~/`` (``res_net50/~/block_group_0/~/block_0/~/conv_0``)."""

        def __init__(self, name):
            super().__init__(name=name)
            self.initial_conv = hk.Conv2D(stem_channels * width, kernel_shape=7, stride=2,
                                          with_bias=False, padding="SAME", name="initial_conv")
            self.initial_batchnorm = hk.BatchNorm(name="initial_batchnorm", **BN_CONFIG)
            self.block_groups = [hk.nets.ResNet.BlockGroup(
                channels=width * channels[i], num_blocks=blocks[i], stride=(1, 2, 2, 2)[i],
                bn_config=BN_CONFIG, resnet_v2=False, bottleneck=bottleneck,
                use_projection=True, name=f"block_group_{i}") for i in range(4)]

        def __call__(self, x):
            x = jax.nn.relu(self.initial_batchnorm(self.initial_conv(x), is_training))
            x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
            for group in self.block_groups:
                x = group(x, is_training, False)
            return jnp.mean(x, axis=(1, 2))

    class MLP(hk.Module):
        """Sub-modules made in the call, as the official ``MLP`` does: ``projector/linear``."""

        def __call__(self, x):
            x = hk.Linear(hidden, with_bias=True)(x)
            x = jax.nn.relu(hk.BatchNorm(**BN_CONFIG)(x, is_training))
            return hk.Linear(output, with_bias=False)(x)

    representation = Torso(f"res_net{depth}")(images)
    projection = MLP(name="projector")(representation)
    prediction = MLP(name="predictor")(projection)
    logits = hk.Linear(num_classes, name="classifier")(jax.lax.stop_gradient(representation))
    return {"representation": representation, "projection": projection,
            "prediction": prediction, "logits": logits}


def official_network(depth, *, width=1, hidden=32, output=16, num_classes=10):
    return hk.transform_with_state(lambda images, is_training: official_forward(
        images, depth=depth, width=width, hidden=hidden, output=output,
        num_classes=num_classes, is_training=is_training))


def randomised(tree, seed):
    """Every leaf random and of moderate size (BatchNorm scales near 1, variances positive),
    so that a swapped, transposed or skipped array changes the outputs."""
    rng = np.random.default_rng(seed)

    def leaf(path, value):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        shape = value.shape
        if name.endswith("counter"):
            return np.asarray(rng.integers(1, 100), np.int32)
        if "var_ema" in name:
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if name.endswith("/scale"):
            return rng.uniform(0.5, 1.0, shape).astype(np.float32)
        if "mean_ema" in name or name.endswith("/offset") or name.endswith("/b"):
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    randomised_tree = jax.tree_util.tree_map_with_path(leaf, tree)
    for module in randomised_tree.values():  # hk.BatchNorm's EMA keeps hidden == average
        if "average" in module:
            module["hidden"] = module["average"]
    return randomised_tree


def frozen(tree):
    """Haiku's mappings as the 2020 release pickled them (``frozendict`` of ``frozendict``)."""
    return data_structures.frozendict(
        {module: data_structures.frozendict(dict(entries)) for module, entries in tree.items()})


class _ByolExperimentState(NamedTuple):
    online_params: object
    target_params: object
    online_state: object
    target_state: object
    opt_state: object


class ScaleByLarsState(NamedTuple):
    mu: object


class AddWeightDecayState(NamedTuple):
    pass


@pytest.fixture
def release_classes(monkeypatch):
    """The release's classes under their names (``byol.byol_experiment`` etc.), for pickling."""
    for name in ("byol", "byol.utils", "byol.byol_experiment", "byol.utils.optimizers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for cls, module in ((_ByolExperimentState, "byol.byol_experiment"),
                        (ScaleByLarsState, "byol.utils.optimizers"),
                        (AddWeightDecayState, "byol.utils.optimizers")):
        monkeypatch.setattr(cls, "__module__", module)
        setattr(sys.modules[module], cls.__name__, cls)


def write_release_pickle(path, params, state, *, step=300_000, dump=pickle.dump):
    """The layout of the release's ``utils/checkpointing.py``: protocol 2, device-0 arrays
    (``dump=dill.dump`` writes it as the release did)."""
    params, state = frozen(params), frozen(state)
    mu = frozen(jax.tree.map(np.zeros_like, dict(params)))
    experiment_state = _ByolExperimentState(
        online_params=params, target_params=params, online_state=state, target_state=state,
        opt_state=[AddWeightDecayState(), ScaleByLarsState(mu=mu)])
    rng = np.asarray(jax.random.key_data(jax.random.key(0)))
    with open(path, "wb") as file:
        dump({"experiment_state": experiment_state, "step": step, "rng": rng}, file, protocol=2)


def make_release(tmp_path, depth, size, seed=0, **sizes):
    network = official_network(depth, **sizes)
    images = np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)
    shapes = jax.eval_shape(lambda: network.init(jax.random.key(0), images, True))
    params, state = (randomised(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree), seed)
                     for tree in shapes)
    path = tmp_path / f"pretrain_res{depth}x1.pkl"
    write_release_pickle(path, params, state)
    reference, _ = jax.jit(lambda p, s, x: network.apply(p, s, None, x, False))(
        params, state, images)
    return path, images, reference


def ours(imported, images):
    """Our modules' outputs for ``images``, BatchNorm in inference mode."""
    modules = {"encoder": imported.encoder, **imported.heads()}
    for module in modules.values():
        module.eval()

    @jax.jit
    def forward(modules, images):
        representation = modules["encoder"](images)
        projection = modules["projector"](representation)
        return {"representation": representation, "projection": projection,
                "prediction": modules["predictor"](projection),
                "logits": modules["classifier"](representation)}

    return forward(modules, images)


def assert_equal_outputs(got, reference):
    for key, expected in reference.items():
        scale = max(1.0, float(np.max(np.abs(expected))))
        error = float(np.max(np.abs(np.asarray(got[key]) - np.asarray(expected))))
        assert error <= 1e-5 * scale, f"{key}: max |ours - official| = {error} (scale {scale})"


def test_imported_official_resnet50_computes_what_haiku_computes(tmp_path, release_classes):
    """ResNet-50 (bottleneck blocks) on an even size: the representation, projection,
    prediction and classifier logits equal Haiku's within 1e-5 (ResNet-18 on an odd size, where
    SAME pads unevenly, is the command's test below)."""
    path, images, reference = make_release(tmp_path, 50, 32)
    imported = official.import_official(path)
    assert imported.model_config["encoder"] == official_encoder("resnet50", 1)
    assert imported.origin["step"] == 300_000
    assert len(imported.origin["sha256"]) == 64
    # Appendix D.2, Table 9: ResNet-50 1x has 24M weights.
    assert round(count_params(imported.encoder) / 1e6) == 24
    assert_equal_outputs(ours(imported, images), reference)


@pytest.mark.slow  # ~10 s: import, then evaluate, end to end
def test_import_command_writes_an_export_that_evaluation_reads(tmp_path, release_classes):
    """The command writes our export format with its heads and a model card whose provenance
    names the file, its sha256, the step and the source; ``--source`` loads it."""
    path, images, reference = make_release(tmp_path, 18, 33, hidden=16, output=8,
                                           num_classes=5)
    out = tmp_path / "exports" / "official_r18"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "byol_flax.export.import_official",
                          f"--checkpoint={path}", f"--out={out}"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["checkpoint"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["checkpoint"]["step"] == 300_000
    assert card["checkpoint"]["path"] == str(path)
    assert "deepmind-research" in card["checkpoint"]["source"]
    assert "official" in (out / "MODEL_CARD.md").read_text()
    exported = load_export(out, with_heads=True)
    assert sorted(exported.heads()) == ["classifier", "predictor", "projector"]
    assert_equal_outputs(ours(exported, images), reference)
    assert load_source(str(out)).origin["kind"] == "export"


def test_resnet200x2_names_and_shapes_map_without_allocating(release_classes):
    """The release's largest network: every Haiku name of a ResNet-200 2x maps onto our
    resnet200 at width 2 with equal shapes, checked on shapes only."""
    network = official_network(200, width=2, hidden=4096, output=256, num_classes=1000)
    params, state = jax.eval_shape(
        lambda: network.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), True))
    model, modules = official.map_official(params, state, abstract=True)
    assert model["encoder"] == official_encoder("resnet200", 2)
    assert modules["encoder"].num_features == 4096
    assert (model["projector"]["hidden_size"], model["projector"]["output_size"],
            model["predictor"]["hidden_size"]) == (4096, 256, 4096)
    leaves = jax.tree.leaves(nnx.state(modules["encoder"]))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    # Appendix D.2, Table 9: ResNet-200 2x has 250M weights (BatchNorm statistics excluded).
    params_count = sum(int(np.prod(leaf.shape)) for leaf in
                       jax.tree.leaves(nnx.state(modules["encoder"], nnx.Param)))
    assert round(params_count / 1e7) == 25, params_count
    # The bound the import checks before building counts what the modules hold.
    held = sum(int(np.prod(leaf.shape)) for module in modules.values()
               for leaf in jax.tree.leaves(nnx.state(module)))
    assert official.describe_architecture(params)["parameters"] == held


def test_mismatches_are_listed(release_classes):
    """A wrong shape, a missing and an extra array: one error listing each."""
    network = official_network(18)
    params, state = jax.eval_shape(
        lambda: network.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), True))
    params = {module: dict(entries) for module, entries in params.items()}
    conv = "res_net18/~/block_group_1/~/block_0/~/conv_1"
    params[conv]["w"] = jax.ShapeDtypeStruct((3, 3, 128, 64), jnp.float32)
    del params["res_net18/~/block_group_2/~/block_1/~/batchnorm_0"]
    params["res_net18/~/extra_head"] = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    with pytest.raises(official.OfficialCheckpointError) as error:
        official.map_official(params, state, abstract=True)
    message = str(error.value)
    assert "\n" not in message
    assert f"shape: params {conv}/w is (3, 3, 128, 64)" in message
    assert "missing: params res_net18/~/block_group_2/~/block_1/~/batchnorm_0/scale" in message
    assert "extra: params res_net18/~/extra_head/w" in message


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_naming_any_other_global_is_refused_without_running_it(tmp_path):
    """``os.system`` (or any class outside the release's layout) is refused by name before
    anything is called: the command it carries never runs."""
    marker = tmp_path / "was_run"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "pretrain_res50x1.pkl"
    path.write_bytes(pickle.dumps({"experiment_state": exploit, "step": 1}, protocol=2))
    with pytest.raises(official.UnsafePickleError, match=r"refused to load global "
                       r"(posix|os)\.system"):
        official.import_official(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_Exploit, protocol=2))  # a class of another module
    with pytest.raises(official.UnsafePickleError, match=r"test_official_weights\._Exploit"):
        official.import_official(path)


def test_not_a_release_file_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"params": np.zeros(3)}, protocol=2))
    with pytest.raises(official.OfficialCheckpointError,
                       match=r"weights.pkl: expected dict\(experiment_state=.*got \['params'\]"):
        official.import_official(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(official.OfficialCheckpointError, match="not a readable pickle"):
        official.import_official(path)


# -- The release as dill wrote it ---------------------------------------------------------------

def release_values(shapes, seed):
    """The fixture script's values, regenerated here from the Haiku network's own names and
    shapes: one ``RandomState(seed)`` stream over the sorted (module, name) pairs of the
    parameters, then of the state; weights scaled by fan-in, BatchNorm scales in [0.5, 1),
    variances in [0.5, 2), other arrays 0.1 x normal, EMA counters in [1, 1000), each EMA's
    ``hidden`` a copy of its ``average``. Equal arrays mean the script wrote Haiku's layout."""
    rng = np.random.RandomState(seed)
    trees = []
    for tree in shapes:
        arrays = {}
        for module in sorted(tree):
            arrays[module] = {}
            for name in sorted(tree[module]):
                shape = tree[module][name].shape
                if name == "hidden":
                    continue
                if name == "counter":
                    value = np.asarray(rng.randint(1, 1000), np.int32)
                elif module.endswith("var_ema"):
                    value = rng.uniform(0.5, 2.0, shape).astype(np.float32)
                elif name == "scale":
                    value = rng.uniform(0.5, 1.0, shape).astype(np.float32)
                elif name == "w":
                    fan_in = int(np.prod(shape[:-1]))
                    value = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
                else:
                    value = (0.1 * rng.standard_normal(shape)).astype(np.float32)
                arrays[module][name] = value
            if "average" in arrays[module]:
                arrays[module]["hidden"] = arrays[module]["average"].copy()
        trees.append(arrays)
    return tuple(trees)


@pytest.fixture(scope="module")
def tiny_release():
    """The fixture network's parameters and state from the seed, 33-px images (odd: SAME pads
    unevenly) and the Haiku network's outputs for them."""
    sizes = {key: value for key, value in FIXTURE_SIZES.items() if key != "depth"}
    network = official_network(FIXTURE_SIZES["depth"], **sizes)
    images = np.random.default_rng(1).standard_normal((2, 33, 33, 3)).astype(np.float32)
    params, state = release_values(
        jax.eval_shape(lambda: network.init(jax.random.key(0), images, True)), FIXTURE_SEED)
    reference, _ = jax.jit(lambda p, s, x: network.apply(p, s, None, x, False))(
        params, state, images)
    return params, state, images, reference


def assert_trees_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for module, entries in expected.items():
        assert sorted(got[module]) == sorted(entries), module
        for name, value in entries.items():
            assert got[module][name].dtype == value.dtype, (module, name)
            np.testing.assert_array_equal(got[module][name], value, err_msg=f"{module}/{name}")


def test_a_release_file_written_by_dill_0_3_2_imports_as_the_official_network(tiny_release):
    """The bytes of 2020: dill 0.3.2's ``_create_namedtuple`` and
    ``_get_attr(_import_module("numpy.core._multiarray_umath"), "_reconstruct")``. Every array
    equals the seed's, the network is our ``resnet_tiny`` and computes Haiku's outputs."""
    params, state, images, reference = tiny_release
    data = FIXTURE.read_bytes()
    for written_by_dill_032 in (b"dill._dill\n_create_namedtuple", b"dill._dill\n_get_attr",
                                b"numpy.core._multiarray_umath"):
        assert written_by_dill_032 in data
    content, sha256 = official.read_official_checkpoint(FIXTURE)
    assert sha256 == hashlib.sha256(data).hexdigest()
    experiment = content["experiment_state"]
    assert_trees_equal(experiment.online_params, params)
    assert_trees_equal(experiment.online_state, state)
    assert content["step"] == 300_000
    np.testing.assert_array_equal(content["rng"], np.array([0, 42], np.uint32))
    imported = official.import_official(FIXTURE)
    assert imported.model_config["encoder"] == official_encoder("resnet_tiny", 1)
    assert imported.origin["step"] == 300_000
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(
        imported.encoder)))  # every array from the file, none left shape-only
    assert_equal_outputs(ours(imported, images), reference)


def test_a_release_file_written_by_todays_dill_imports_as_the_official_network(
        tmp_path, release_classes, tiny_release):
    """Today's dill wraps every array in ``_create_array`` and writes the NamedTuples with
    ``_create_namedtuple``: read through the same vetted array path."""
    dill = pytest.importorskip("dill", reason="dill (the dev extra) wrote the release")
    params, state, images, reference = tiny_release
    path = tmp_path / "pretrain_tiny.pkl"
    write_release_pickle(path, params, state, dump=dill.dump)
    data = path.read_bytes()
    assert b"dill._dill\n_create_array" in data and b"dill._dill\n_create_namedtuple" in data
    imported = official.import_official(path)
    assert imported.model_config["encoder"]["name"] == "resnet_tiny"
    assert_equal_outputs(ours(imported, images), reference)


def test_a_refused_hostile_build_leaves_a_later_genuine_import_intact(tmp_path, tiny_release):
    """Was a hijack: BUILD on the release's NamedTuple class was refused but left its
    ``online_params`` set, so a later genuine import in the process returned the attacker's
    weights."""
    params = tiny_release[0]
    attacker = {"res_net_tiny/~/initial_conv": {"w": np.zeros((7, 7, 3, 8), np.float32)}}
    hostile = tmp_path / "pretrain_res50x1.pkl"
    hostile.write_bytes(b"\x80\x02cbyol.byol_experiment\n_ByolExperimentState\n"
                        + pickle.dumps(attacker, protocol=2)[2:-1] + b"b.")
    with pytest.raises(official.UnsafePickleError, match="BUILD on the global "
                       "byol.byol_experiment._ByolExperimentState refused"):
        official.import_official(hostile)
    imported = official.import_official(FIXTURE)
    np.testing.assert_array_equal(imported.encoder.stem_conv.kernel[...],
                                  params["res_net_tiny/~/initial_conv"]["w"])


@pytest.mark.parametrize("change, expected", [
    ("nan", (r"value: params res_net_tiny/~/block_group_1/~/block_0/~/conv_0/w has 1 "
             r"non-finite value\(s\)")),
    ("complex", r"value: params classifier/w has dtype complex64: weights must be real"),
])
def test_non_finite_or_complex_weights_are_refused_by_name(tmp_path, release_classes,
                                                          tiny_release, change, expected):
    params, state = ({module: dict(entries) for module, entries in tree.items()}
                     for tree in tiny_release[:2])
    if change == "nan":
        conv = params["res_net_tiny/~/block_group_1/~/block_0/~/conv_0"]
        conv["w"] = conv["w"].copy()
        conv["w"][0, 0, 0, 0] = np.nan
    else:
        params["classifier"]["w"] = params["classifier"]["w"].astype(np.complex64)
    path = tmp_path / "pretrain_tiny.pkl"
    write_release_pickle(path, params, state)
    with pytest.raises(official.OfficialCheckpointError, match=expected) as error:
        official.import_official(path)
    assert "\n" not in str(error.value)


def test_the_architecture_in_the_file_is_bounded_before_anything_is_allocated():
    """Head sizes, the stem's width and the total count come from the file: a classifier of
    10^7 classes (a zero-stride view: 20 GB if anything copied it), a 4096x stem, an empty
    hidden layer or heads too large for any network of the paper are one line each, before
    a module is built."""
    network = official_network(18)
    params, state = jax.eval_shape(
        lambda: network.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), True))
    params = {module: dict(entries) for module, entries in params.items()}
    def shaped(*shape):
        return {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}

    cases = [
        ({"classifier": {"w": np.broadcast_to(np.float32(0), (512, 10**7)),
                         "b": np.broadcast_to(np.float32(0), (10**7,))}},
         r"params classifier/w has shape \(512, 10000000\): .* 1 to 65536 outputs"),
        ({"res_net18/~/initial_conv": shaped(7, 7, 3, 64 * 4096)},
         r"262144 stem channels: not a ResNet this project builds at width 1-4"),
        ({"projector/linear": shaped(512, 0)}, r"params projector/linear/w has shape \(512, 0\)"),
        ({"projector/linear": shaped(512, 65_536),
          "projector/linear_1": shaped(65_536, 65_536)},
         r"has [\d,]+ numbers, more than the 600,000,000 of the largest network of the paper"),
    ]
    for changed, expected in cases:
        with pytest.raises(official.OfficialCheckpointError, match=expected) as error:
            official.map_official({**params, **changed}, state)
        assert "\n" not in str(error.value)
    assert official.describe_architecture(params)["model"]["encoder"]["name"] == "resnet18"
