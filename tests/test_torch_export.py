"""The PyTorch export (``byol_flax.export --format=torch``): torchvision's key layout, the exact
twin module (XLA "SAME" padding) against our JAX encoder, torchvision's symmetric padding as the
measured alternative, and the command."""

import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the PyTorch export's tests need torch: pip install "
                            "-e '.[torch]' (CI installs it)")

from byol_flax.export import encoder as export  # noqa: E402
from byol_flax.export import model_card, torch_format, torch_resnet  # noqa: E402
from byol_flax.models.encoders import build_encoder  # noqa: E402
from byol_flax.models.init import init_module  # noqa: E402
from byol_flax.models.resnet import BatchNormConfig  # noqa: E402
from byol_flax.runtime import outputs  # noqa: E402
from byol_flax.weights import encoder as weights  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

BN = {"decay": 0.9, "eps": 1e-5}


@functools.cache
def random_encoder(name: str, stem: str, width: int) -> weights.PretrainedEncoder:
    """An encoder whose every array is random, BatchNorm statistics included (a test that swaps
    mean and variance, scale and bias, or transposes a kernel wrongly fails)."""
    model = init_module(lambda: build_encoder(name, width_multiplier=width, stem=stem,
                                              bn=BatchNormConfig(**BN), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def randomise(path, leaf):
        shape, kind = leaf.shape, path[-1].key
        if kind == "kernel":  # HWIO, variance-preserving through the ReLUs
            return rng.normal(0, math.sqrt(2 / math.prod(shape[:-1])), shape)
        low, high = {"scale": (0.5, 1.0), "bias": (-0.2, 0.2), "mean": (-0.2, 0.2),
                     "var": (0.5, 2.0)}[kind]
        return rng.uniform(low, high, shape)

    state = nnx.state(model)
    arrays = jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(randomise(p, x), np.float32), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, arrays)
    nnx.update(model, state)
    model.eval()
    config = {"encoder": {"name": name, "stem": stem, "width_multiplier": width}, "batchnorm": BN}
    return weights.PretrainedEncoder(model, config, {"kind": "test"})


def images(size: int, batch: int = 2) -> np.ndarray:
    """Normalised-looking NHWC images."""
    return np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)


def jax_features(pretrained: weights.PretrainedEncoder, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, v: m(v))(pretrained.encoder, x))


def torch_features(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def written(pretrained: weights.PretrainedEncoder, tmp_path, padding: str = "same"
            ) -> torch.nn.Module:
    path = tmp_path / torch_format.WEIGHTS_NAME
    torch_format.save_torch_weights(pretrained, path)
    return torch_resnet.load_torch_encoder(path, padding=padding)


# ----------------------------------------------------------------------------------------------
# (a) The twin module reproduces our features.


@pytest.mark.parametrize("name,stem,width,size", [
    ("resnet18", "imagenet", 1, 33),  # odd sizes; the even ones (asymmetric padding) below
    ("resnet50", "imagenet", 1, 32),  # bottleneck, stride on the 3x3
    ("resnet_tiny", "imagenet", 2, 32),  # width multiplier; every strided layer on an even size
    ("resnet_tiny", "small", 1, 16),  # 3x3/1 stem, no max-pool
])
def test_torch_module_equals_the_jax_encoder(name, stem, width, size, tmp_path):
    pretrained = random_encoder(name, stem, width)
    model = written(pretrained, tmp_path)
    assert not model.training
    x = images(size)
    ours, theirs = jax_features(pretrained, x), torch_features(model, x)
    assert theirs.shape == ours.shape == (2, pretrained.encoder.num_features)
    assert ours.std() > 0.1  # features of substance: the comparison can fail
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# (b) torchvision's state-dict layout.


def torchvision_keys(blocks: tuple[int, ...], bottleneck: bool) -> set[str]:
    """torchvision.models.resnet's state-dict keys without fc.*: downsample where the shape
    changes (every first block, except layer1.0 of the basic-block nets: 64 -> 64, stride 1)."""
    bn = lambda p: {f"{p}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                          "num_batches_tracked")}
    keys = {"conv1.weight", *bn("bn1")}
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            prefix = f"layer{stage}.{index}"
            for number in range(1, 4 if bottleneck else 3):
                keys |= {f"{prefix}.conv{number}.weight", *bn(f"{prefix}.bn{number}")}
            if index == 0 and (stage > 1 or bottleneck):
                keys |= {f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")}
    return keys


def test_keys_are_torchvisions_resnet_layout():
    resnet18, resnet50 = torchvision_keys((2, 2, 2, 2), False), torchvision_keys((3, 4, 6, 3), True)
    assert (len(resnet18) + 2, len(resnet50) + 2) == (122, 320)  # torchvision's, with fc.*

    arrays, arch = torch_format.torch_arrays(random_encoder("resnet50", "imagenet", 1))
    assert set(arrays) == resnet50 and arch["torchvision_equivalent"] == "resnet50"
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
              "layer1.0.conv2.weight": (64, 64, 3, 3), "layer1.0.downsample.0.weight":
              (256, 64, 1, 1), "layer4.2.bn3.running_var": (2048,),
              "layer4.0.conv2.weight": (512, 512, 3, 3)}
    assert {k: arrays[k].shape for k in shapes} == shapes
    assert arrays["bn1.num_batches_tracked"].dtype == np.int64
    assert arrays["bn1.num_batches_tracked"].shape == ()
    assert arch["representation_size"] == 2048

    # Our basic-block nets project the shortcut of layer1.0 as well (every stage's first block):
    # six keys torchvision's resnet18 has no place for, so no stock equivalent is claimed.
    arrays, arch = torch_format.torch_arrays(random_encoder("resnet18", "imagenet", 1))
    assert set(arrays) - resnet18 == {"layer1.0.downsample.0.weight",
                                      *[f"layer1.0.downsample.1.{k}" for k in (
                                          "weight", "bias", "running_mean", "running_var",
                                          "num_batches_tracked")]}
    assert resnet18 <= set(arrays) and arch["torchvision_equivalent"] is None
    assert (torch_format.WEIGHTS_NAME, torch_format.METADATA_KEY, torch_format.FORMAT_VERSION) \
        == (torch_resnet.WEIGHTS_NAME, torch_resnet.METADATA_KEY, torch_resnet.FORMAT_VERSION)


def test_only_our_resnet_exports():
    pretrained = weights.PretrainedEncoder(weights.PixelEncoder(8), {"encoder": {"name": "pixels"}},
                                          {"kind": "test"})
    with pytest.raises(torch_format.TorchExportError,
                       match="encoder 'pixels' is a PixelEncoder, not byol_flax.models.resnet"):
        torch_format.torch_arrays(pretrained)


# ----------------------------------------------------------------------------------------------
# (c) torchvision's symmetric padding: differs on strided layers at even sizes only.


@pytest.mark.parametrize("size,kernel,stride,pads", [
    (224, 7, 2, (2, 3)), (225, 7, 2, (3, 3)), (112, 3, 2, (0, 1)), (57, 3, 2, (1, 1)),
    (56, 1, 2, (0, 0)), (56, 3, 1, (1, 1)), (8, 7, 1, (3, 3)),
])
def test_same_padding_is_xlas(size, kernel, stride, pads):
    assert torch_resnet.same_padding(size, kernel, stride) == pads
    x = jax.numpy.ones((1, size, size, 1))
    out = jax.lax.conv_general_dilated(x, jax.numpy.ones((kernel, kernel, 1, 1)), (stride,) * 2,
                                       "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # The top-left output sees kernel - before rows and columns of ones.
    assert float(out[0, 0, 0, 0]) == (kernel - pads[0]) ** 2


@pytest.mark.parametrize("name,stem,size,differs", [
    ("resnet_tiny", "imagenet", 32, True),  # 32 -> 16 -> 8 -> ...: every strided layer even
    ("resnet_tiny", "imagenet", 33, False),  # 33 -> 17 -> 9 -> 5 -> 3: all odd, paddings coincide
    ("resnet_tiny", "small", 8, True),  # stride-1 stem coincides, the stride-2 blocks do not
    ("resnet_tiny", "small", 9, False),
])
def test_symmetric_padding_differs_exactly_where_expected(name, stem, size, differs, tmp_path):
    pretrained = random_encoder(name, stem, 1)
    x = images(size)
    same_model = written(pretrained, tmp_path)
    symmetric_model = written(pretrained, tmp_path, padding="symmetric")
    half = 3 if stem == "imagenet" else 1  # torchvision's fixed k // 2
    assert (same_model.conv1.padding, symmetric_model.conv1.padding) == ((0, 0), (half, half))
    same, symmetric = torch_features(same_model, x), torch_features(symmetric_model, x)
    gap = np.abs(same - symmetric).max()
    assert (gap > 1e-2) if differs else (gap < 1e-5), gap


# ----------------------------------------------------------------------------------------------
# (d), (e) The command.


def run_export(*args: str, tmp_path) -> subprocess.CompletedProcess:
    """``python -m byol_flax.export ARGS`` with torch made unimportable: writing needs none."""
    blocked = tmp_path / "no_torch" / "torch"
    blocked.mkdir(parents=True, exist_ok=True)
    (blocked / "__init__.py").write_text("raise ImportError('torch blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(blocked.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "byol_flax.export", *args], env=env,
                           capture_output=True, text=True, timeout=120)


def test_cli_writes_a_torch_export_of_an_export_directory(tmp_path):
    model_config = json.loads(tiny_config().model.to_json())
    source = weights.PretrainedEncoder(weights.encoder_from_model_config(model_config, seed=3),
                                      model_config, {"kind": "test", "step": 5})
    export_dir = export.export_encoder(source, tmp_path / "export", write_extra=lambda d:
                                       model_card.write_model_card(
                                           d, model_card.build_model_card(source)))
    out = tmp_path / "torch"
    done = run_export("--format=torch", f"--source={export_dir}", f"--out={out}",
                      "--intended_use=tests", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [torch_format.WEIGHTS_NAME, model_card.CARD_JSON, model_card.CARD_MARKDOWN,
         outputs.MARKER_NAME])

    model = torch_resnet.load_torch_encoder(out)  # the directory names its file
    source.encoder.eval()  # export -> load_source -> torch file: the features are the source's
    x = images(8, batch=4)
    np.testing.assert_allclose(torch_features(model, x), jax_features(source, x), atol=1e-4,
                               rtol=0)
    card = model_card.read_model_card(out)
    assert card["checkpoint"]["kind"] == "export" and card["checkpoint"]["step"] == 5
    assert card["intended_use"] == "tests"
    assert card["export"]["format"] == "torch"
    assert card["export"]["architecture"]["stem"] == "small"
    markdown = (out / model_card.CARD_MARKDOWN).read_text()
    assert "load_torch_encoder(DIR)" in markdown and "load_encoder(DIR)" not in markdown


def test_cli_names_a_bad_source_in_one_line(tmp_path):
    done = run_export("--format=torch", f"--source={tmp_path / 'nothing'}",
                      f"--out={tmp_path / 'out'}", tmp_path=tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors[0].startswith("error: SourceError: --source=") and "nothing" in errors[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# (d) The loader checks the file before it spends memory.

def rewritten(path, *, metadata_change=None, tensor_change=None) -> None:
    """Re-writes an encoder.safetensors with its metadata's architecture or a tensor changed."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    architecture = json.loads(metadata[torch_format.METADATA_KEY])
    if metadata_change:
        metadata_change(architecture)
    if tensor_change:
        tensor_change(tensors)
    metadata[torch_format.METADATA_KEY] = json.dumps(architecture)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("metadata_change, tensor_change, message", [
    (lambda a: a["architecture"].update(stage_channels=[8, 16, 32, 60000]), None,
     "architecture.stage_channels must list 1-8 integers in [1, 8192]"),
    (lambda a: a["architecture"].update(blocks_per_stage=[1, 1, 1, 10**9]), None,
     "architecture.blocks_per_stage must list"),
    (lambda a: a["architecture"].update(stage_channels=[8, 16, 32, 128]), None,
     "tensor layer4.0.bn1.bias is (64,) in the file, the recorded architecture needs (128,)"),
    (lambda a: a.pop("checksums"), None, "metadata holds no per-tensor checksums"),
    (None, lambda t: t["layer2.0.conv1.weight"].__setitem__((0, 0, 0, 0), 7.0),
     "is damaged: tensor layer2.0.conv1.weight differs from the checksum"),
])
def test_a_tampered_torch_export_is_refused_naming_the_key(metadata_change, tensor_change,
                                                           message, tmp_path):
    path = tmp_path / torch_format.WEIGHTS_NAME
    torch_format.save_torch_weights(random_encoder("resnet_tiny", "small", 1), path)
    torch_resnet.load_torch_encoder(path)
    rewritten(path, metadata_change=metadata_change, tensor_change=tensor_change)
    with pytest.raises(torch_resnet.ExportFileError, match=re.escape(message)):
        torch_resnet.load_torch_encoder(path)


def test_flipped_bytes_in_a_torch_export_are_named(tmp_path):
    path = tmp_path / torch_format.WEIGHTS_NAME
    torch_format.save_torch_weights(random_encoder("resnet_tiny", "small", 1), path)
    data = bytearray(path.read_bytes())
    data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])  # 64 bytes of the last tensors
    path.write_bytes(bytes(data))
    with pytest.raises(torch_resnet.ExportFileError, match="is damaged: tensor"):
        torch_resnet.load_torch_encoder(path)


def test_the_torch_loaders_limits_are_the_packages():
    from byol_flax.models.encoders import WIDTH_MULTIPLIERS
    from byol_flax.weights.encoder import MAX_PARAMETERS
    assert torch_resnet.LIMITS["parameters"] == MAX_PARAMETERS
    assert torch_resnet.LIMITS["width_multiplier"] == max(WIDTH_MULTIPLIERS)
    assert torch_resnet.FORMAT_VERSION == torch_format.FORMAT_VERSION
