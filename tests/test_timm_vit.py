"""The Vision Transformer's PyTorch export and import in timm's layout
(``byol_flax.export.timm_vit``): timm's own ``VisionTransformer`` loads our arrays strictly and
computes our features; ViT-S/16 and ViT-B/16 have timm's parameter counts and shapes; the export
command writes a timm file and a card that says how to load it; ``config.model.init_from`` starts
a run from a timm checkpoint (a classifier head included) and refuses one of another shape
naming the tensor."""

import json
import math
import os
import re
import time

import jax
import numpy as np
import optax
import pytest
import safetensors.torch
import timm
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from byol_flax.export import encoder as export
from byol_flax.export import model_card, timm_vit, torch_format, torch_vit
from byol_flax.init_from import InitFromError, apply_init_from, check_init_from
from byol_flax.models.encoders import build_encoder
from byol_flax.models.init import init_module
from byol_flax.train_state import create_train_state
from byol_flax.weights import encoder as weights
from tests.helpers import tiny_vit_config as vit_config
from tests.test_init_from import refusal

IMAGE_SIZE = 16  # vit_micro with the small stem: 4-px patches, a 4 x 4 grid, 17 tokens
MICRO = {"embed_dim": 64, "depth": 4, "num_heads": 4}  # VIT_SIZES["vit_micro"]


def randomise(module: nnx.Module, seed: int) -> None:
    """Every array random (LayerNorm scales and biases, the class token, the sin-cos embedding
    too): a swapped, untransposed or misordered array fails the comparison."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape, name = leaf.shape, str(path[-1].key)
        if name == "kernel" or name == "patch_kernel":
            return rng.normal(0, 1 / math.sqrt(shape[0]), shape)
        return 1.0 + 0.2 * rng.normal(size=shape) if name == "scale" else (
            0.2 * rng.normal(size=shape))

    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(draw(p, x), np.float32), nnx.to_pure_dict(state)))
    nnx.update(module, state)


def micro_vit(seed: int = 0, **options) -> weights.PretrainedEncoder:
    encoder_config = {"name": "vit_micro", "stem": "small", "width_multiplier": 1,
                      "image_size": IMAGE_SIZE, **options}
    model = init_module(lambda: build_encoder(
        "vit_micro", stem="small", image_size=IMAGE_SIZE, rngs=nnx.Rngs(seed), **options))
    randomise(model, seed)
    return weights.PretrainedEncoder(model, {"encoder": encoder_config}, {"kind": "test"})


def images(batch: int = 3, size: int = IMAGE_SIZE) -> np.ndarray:
    """Normalised-looking NHWC images."""
    return np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)


def jax_features(encoder: nnx.Module, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, v: m(v))(encoder, x))


def timm_features(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The pooled representation (before any classifier head) of NHWC images."""
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        return model.forward_head(tokens, pre_logits=True).numpy()


# ----------------------------------------------------------------------------------------------
# (a) timm's own VisionTransformer loads the export strictly and computes our features.


@pytest.mark.parametrize("options", [
    {},  # class token after the final LayerNorm, fixed sin-cos positions (MoCo v3's)
    {"pooling": "mean", "position_embedding": "learned", "num_heads": 2},  # fc_norm, 2 heads
])
def test_timm_computes_our_features_from_the_export(options, tmp_path):
    pretrained = micro_vit(**options)
    path = tmp_path / torch_format.WEIGHTS_NAME
    meta = torch_format.save_torch_weights(pretrained, path)

    # With timm and safetensors alone, as the model card says.
    with safe_open(str(path), framework="pt") as handle:
        arch = json.loads(handle.metadata()[torch_format.METADATA_KEY])["architecture"]
    assert arch == meta["architecture"] and meta["layout"] == "timm"
    assert arch["num_heads"] == options.get("num_heads", MICRO["num_heads"])
    assert meta["timm_model"] is None  # vit_micro is no stock timm shape
    model = TimmVisionTransformer(**arch)
    model.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    model.eval()
    final_norm = "fc_norm" if options.get("pooling") == "mean" else "norm"
    assert isinstance(getattr(model, final_norm), torch.nn.LayerNorm)

    x = images()
    ours, theirs = jax_features(pretrained.encoder, x), timm_features(model, x)
    assert theirs.shape == ours.shape == (3, MICRO["embed_dim"])
    assert ours.std() > 0.1  # features of substance: the comparison can fail
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # The checked loader gives the same module.
    np.testing.assert_allclose(timm_features(torch_vit.build_timm_model(tmp_path), x), ours,
                               atol=1e-4, rtol=0)


def test_a_tampered_vit_export_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / torch_format.WEIGHTS_NAME
    torch_format.save_torch_weights(micro_vit(), path)
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["blocks.1.attn.qkv.weight"][0, 0] += 1.0
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(torch_vit.ExportFileError,
                       match="is damaged: tensor blocks.1.attn.qkv.weight differs"):
        torch_vit.build_timm_model(path)
    # The loader's names are torch_resnet's, which tests/test_torch_export.py ties to the writer's.
    assert torch_vit.LAYOUT == timm_vit.LAYOUT
    assert torch_vit.LIMITS["parameters"] == weights.MAX_PARAMETERS


# ----------------------------------------------------------------------------------------------
# (b) ViT-S/16 and ViT-B/16: timm's parameter counts, keys and shapes.


@pytest.mark.parametrize("ours,theirs,parameters", [
    ("vit_small", "vit_small_patch16_224", 21_665_664),
    ("vit_base", "vit_base_patch16_224", 85_798_656),
])
def test_vit_s16_and_b16_have_timms_parameters_and_shapes(ours, theirs, parameters):
    encoder = nnx.eval_shape(lambda: build_encoder(ours, stem="imagenet", image_size=224,
                                                   rngs=nnx.Rngs(0)))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(encoder)))
    with torch.device("meta"):
        model = timm.create_model(theirs, pretrained=False, num_classes=0)
    assert count == sum(p.numel() for p in model.parameters()) == parameters
    assert timm_vit.timm_shapes(encoder) == {key: tuple(value.shape)
                                             for key, value in model.state_dict().items()}
    arch = timm_vit.timm_architecture(encoder)
    assert timm_vit.stock_timm_model(arch) == theirs
    assert timm_vit.stock_timm_model({**arch, "depth": 11}) is None


def test_the_stock_names_are_timms():
    assert timm_vit.TIMM_STOCK_MODELS <= set(timm.list_models("vit_*"))


# ----------------------------------------------------------------------------------------------
# (c) The export command on a ViT.


def test_the_torch_export_of_a_vit_writes_timms_layout_and_says_how_to_load_it(tmp_path):
    model_config = json.loads(vit_config().model.to_json())
    source = weights.PretrainedEncoder(weights.encoder_from_model_config(model_config, seed=3),
                                      model_config, {"kind": "test", "step": 5})
    source_dir = export.export_encoder(source, tmp_path / "export")
    # What `python -m byol_flax.export --source=DIR --format=torch --out=...` runs.
    out = model_card.export_with_model_card(None, str(tmp_path / "torch"),
                                            source=str(source_dir), export_format="torch",
                                            intended_use="tests")
    model = torch_vit.build_timm_model(out)
    x = images(batch=2)
    np.testing.assert_allclose(timm_features(model, x), jax_features(source.encoder, x),
                               atol=1e-4, rtol=0)
    card = model_card.read_model_card(out)
    assert card["export"]["layout"] == "timm" and card["export"]["timm_model"] is None
    assert card["export"]["architecture"]["global_pool"] == "token"
    markdown = (out / model_card.CARD_MARKDOWN).read_text()
    assert "VisionTransformer(**arch)" in markdown and "strict=True" in markdown
    assert "load_torch_encoder" not in markdown


# ----------------------------------------------------------------------------------------------
# (d) config.model.init_from: a timm checkpoint.


def timm_file(path, seed: int = 0, **overrides) -> TimmVisionTransformer:
    """A random timm ViT (vit_micro's shape unless overridden, with a 10-class head) saved as a
    stock timm file: timm's keys, no byol_flax metadata."""
    torch.manual_seed(seed)
    kwargs = {"img_size": IMAGE_SIZE, "patch_size": 4, **MICRO, "num_classes": 10, **overrides}
    model = TimmVisionTransformer(**kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    safetensors.torch.save_file(model.state_dict(), str(path))
    return model


@pytest.fixture(scope="module")
def new_state():
    """A factory of copies of one new run's state for vit_config(position_embedding="learned")
    (built and compiled once)."""
    config = vit_config(position_embedding="learned")
    graphdef, state = nnx.split(create_train_state(config, optax.constant_schedule(0.1)))
    return lambda: nnx.merge(graphdef, jax.tree.map(np.array, state))


def test_a_run_starts_from_a_timm_checkpoint(new_state, tmp_path):
    path = tmp_path / "model.safetensors"
    model = timm_file(path)
    config = vit_config(position_embedding="learned")
    config.model.init_from = str(path)
    source = check_init_from(config)
    state = new_state()
    before = nnx.to_pure_dict(nnx.state(state.online.projector))
    provenance = apply_init_from(state, source)

    x = images()
    ours = jax_features(state.online.encoder, x)
    assert ours.std() > 0.1
    np.testing.assert_allclose(ours, timm_features(model, x), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(jax_features(state.target.encoder, x), ours)
    jax.tree.map(np.testing.assert_array_equal,
                 nnx.to_pure_dict(nnx.state(state.online.projector)), before)  # not in the file
    assert provenance["origin"]["kind"] == "timm_file" and provenance["heads"] == []
    assert provenance["fingerprint"] == weights.fingerprint(state.online.encoder)


def test_our_timm_file_is_checked_by_its_metadata(new_state, tmp_path):
    path = tmp_path / "ours.safetensors"
    torch_format.save_torch_weights(micro_vit(position_embedding="learned"), path)
    config = vit_config(position_embedding="learned")
    config.model.init_from = str(path)
    assert check_init_from(config).meta["origin"]["byol_flax_metadata"]
    config.model.encoder.num_heads = 2  # same shapes, other heads: only the metadata tells
    assert "num_heads (model.encoder.num_heads): file 4, config 2" in refusal(config)
    config.model.encoder.num_heads = 0

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["norm.bias"][0] += 1.0
    save_file(tensors, str(path), metadata=metadata)
    state = new_state()
    with pytest.raises(InitFromError, match="is damaged: tensor norm.bias differs"):
        apply_init_from(state, check_init_from(config))


def test_a_timm_file_with_nan_weights_a_fifo_or_deep_metadata_is_refused_in_one_line(
        new_state, tmp_path):
    """The storage layer's rules for timm files (docs/security.md): NaN or infinite weights
    are no encoder to start from; a FIFO is refused before it is opened (no hang); metadata
    nested 100k deep is one line, not a RecursionError."""
    path = tmp_path / "ours.safetensors"
    torch_format.save_torch_weights(micro_vit(position_embedding="learned"), path)
    config = vit_config(position_embedding="learned")
    config.model.init_from = str(path)
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["norm.bias"][0] = np.nan
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(InitFromError, match="tensor norm.bias of .* holds NaN or infinite"):
        apply_init_from(new_state(), check_init_from(config))

    save_file(tensors, str(path), metadata={"byol_flax": "[" * 100_000})
    assert "nests JSON deeper than" in refusal(config)

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    config.model.init_from = str(fifo)
    started = time.monotonic()
    assert "is a FIFO (named pipe), not a regular file" in refusal(config)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("overrides,config_options,message", [
    ({"depth": 2}, {"position_embedding": "learned"},
     "tensor blocks.2.attn.proj.bias is missing from the file, the config's encoder needs (64,)"),
    ({"patch_size": 8}, {"position_embedding": "learned"},
     "tensor patch_embed.proj.weight is (64, 3, 8, 8) in the file, the config's encoder needs "
     "(64, 3, 4, 4)"),
    ({"global_pool": "avg"}, {"position_embedding": "learned"},
     "tensor fc_norm.bias is (64,) in the file, the config's encoder has no such tensor"),
    ({}, {}, "tensor pos_embed is not the fixed sin-cos embedding"),
    ({}, {"name": "resnet_tiny"}, "model.encoder.name='resnet_tiny' is not a ViT"),
])
def test_a_timm_checkpoint_of_another_shape_is_refused_naming_the_tensor(
        overrides, config_options, message, tmp_path):
    path = tmp_path / "model.safetensors"
    timm_file(path, **overrides)
    config = vit_config(**config_options)
    config.model.init_from = str(path)
    assert re.search(re.escape(message), refusal(config))


def test_a_missing_timm_file_is_refused(tmp_path):
    config = vit_config()
    config.model.init_from = str(tmp_path / "model.safetensors")
    assert "model.safetensors'" in refusal(config) and "no such file" in refusal(config)
