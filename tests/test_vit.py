"""Vision Transformer encoders (byol_flax/models/vit.py): the module, the frozen arrays of MoCo
v3's recipe, AdamW's weight-decay exclusions, the sharded and resumed step, bfloat16, the recipe
config (MoCo v3, cited per number), and the digits through the real entry points (pre-training,
export, evaluation). The timm export and import are tests/test_timm_vit.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from byol_flax.checkpointing import Checkpointer
from byol_flax.config import ConfigError, base_config, validate_config
from byol_flax.models.encoders import build_encoder, is_vit
from byol_flax.models.init import init_module
from byol_flax.models.vit import FrozenParam, VisionTransformer, gelu, sincos_position_embedding
from byol_flax.optim import build_optimizer, decay_and_adaptation_mask
from byol_flax.sharding import replicated_sharding, shard_batch
from byol_flax.studies.study import load_config
from tests.helpers import make_views
from tests.helpers import tiny_vit_config as vit_config
from tests.test_train_step import as_numpy, setup

REPO = Path(__file__).resolve().parents[1]


def micro(**options) -> VisionTransformer:
    return init_module(lambda: build_encoder("vit_micro", stem="small", image_size=16,
                                             rngs=nnx.Rngs(0), **options))


def test_representation_is_the_class_token_or_the_mean_of_the_patch_tokens():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 3)), jnp.float32)
    token, mean = micro(), micro(pooling="mean")
    assert token.num_features == 64 and token.grid == (4, 4) and token.num_heads == 4
    y_token, y_mean = token(images), mean(images)
    assert y_token.shape == y_mean.shape == (3, 64)
    # Same weights (same seed): the pooling alone differs, and each is LayerNorm-ed.
    assert not np.allclose(y_token, y_mean)
    for y in (y_token, y_mean):
        np.testing.assert_allclose(np.mean(np.asarray(y), -1), 0, atol=1e-5)
    with pytest.raises(ValueError, match="built for 16-px images"):
        token(images[:, :8, :8])
    assert is_vit("vit_small") and not is_vit("resnet50") and not is_vit("no_such_encoder")


def test_gelu_with_its_closed_form_derivative_equals_jaxs_exact_gelu():
    """The form the ViT computes for XLA:CPU's speed (docs/performance.md) is the same
    function, derivatives included: against jax.nn.gelu's erfc form, and numerically to second
    order."""
    from jax.test_util import check_grads

    x = jnp.linspace(-8.0, 8.0, 97)
    exact = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), exact(x), atol=1e-6)
    check_grads(gelu, (x[::8],), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_patch_size_by_stem_width_multiplier_and_heads():
    encoder = nnx.eval_shape(lambda: build_encoder("vit_small", width_multiplier=2,
                                                   image_size=224, num_heads=12,
                                                   rngs=nnx.Rngs(0)))
    assert encoder.patch_size == 16 and encoder.grid == (14, 14)
    assert encoder.num_features == 768 and encoder.num_heads == 12
    assert encoder.position_embedding.shape == (197, 768)
    with pytest.raises(ValueError, match="does not take patch_size"):
        build_encoder("resnet_tiny", stem="small", patch_size=8, rngs=nnx.Rngs(0))


def test_sincos_position_embedding_is_moco_v3s_layout():
    table = np.asarray(sincos_position_embedding((3, 5), 16))
    assert table.shape == (16, 16) and not table[0].any()  # the class token's row is zero
    omega = 1.0 / 10_000 ** (np.arange(4) / 4)
    row, col = 2, 3
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[1 + row * 5 + col], expected, rtol=1e-6, atol=1e-6)


def test_frozen_arrays_get_no_update_and_trained_ones_do():
    """freeze_patch_projection and the sin-cos position embedding: FrozenParams, equal after
    training steps in the online and target networks; every nnx.Param moves; the collapse
    monitors are reported for the ViT."""
    config = vit_config(freeze_patch_projection=True)
    config.optimizer.kind = "adamw"
    config.optimizer.base_learning_rate = 1e-3
    graphdef, state, step, mesh = setup(config)
    before = as_numpy(state)
    for seed in range(3):
        state, metrics = step(state, shard_batch(make_views(16, seed), mesh))
    assert all(np.isfinite(v).all() for k, v in metrics.items() if k.startswith("collapse/"))
    assert "collapse/representation_std_ratio" in metrics
    merged = nnx.merge(graphdef, state)
    frozen = nnx.state(merged.online.encoder, FrozenParam)
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(frozen)[0]}
    assert names == {"['patch_bias'].value", "['patch_kernel'].value",
                     "['position_embedding'].value"}
    after = as_numpy(state)
    for name in before:
        if "patch_" in name or "position_embedding" in name:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        elif "['online']" in name and "encoder" in name:
            assert not np.array_equal(after[name], before[name]), name
    trained = micro(freeze_patch_projection=False)
    assert isinstance(trained.patch_kernel, nnx.Param)


def test_adamw_decays_kernels_only_not_biases_layernorms_class_token_or_position_embedding():
    """AdamW's decoupled decay (lr x wd x param, PyTorch's) on a zero gradient: the mask of
    Appendix A's exclusions, with timm's no_weight_decay leaves."""
    encoder = micro(position_embedding="learned")
    mask = decay_and_adaptation_mask(encoder)(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
    flags = flat(mask)
    undecayed = {k for k, v in flags.items() if not v}
    assert {k for k in flags if flags[k]} == {
        k for k in flags if k.endswith("['kernel']") or k.endswith("['patch_kernel']")}
    assert "['cls_token']" in undecayed and "['position_embedding']" in undecayed
    assert "['norm']['scale']" in undecayed and "['blocks'][0]['attn']['qkv']['bias']" in undecayed
    config = base_config().optimizer
    config.kind, config.weight_decay = "adamw", 0.1
    learning_rate = 0.5
    optimizer = nnx.Optimizer(encoder, build_optimizer(config, encoder, lambda _: learning_rate),
                              wrt=nnx.Param)
    before = flat(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
    optimizer.update(encoder, jax.tree.map(jnp.zeros_like, nnx.state(encoder, nnx.Param)))
    after = flat(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
    for name, value in after.items():
        factor = 1 - learning_rate * 0.1 if flags[name] else 1.0
        np.testing.assert_allclose(value, np.asarray(before[name]) * factor, rtol=1e-6,
                                   err_msg=name)


def flat(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow  # ~18 s: the ResNet's twin stays in the everyday tier
def test_sharded_vit_step_on_8_devices_equals_single_device_step():
    assert jax.device_count() >= 8
    config = vit_config(batch_size=16)
    batches = [make_views(16, seed) for seed in range(2)]
    finals = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        _, state, step, mesh = setup(config, devices=devices)
        for views in batches:
            state, metrics = step(state, shard_batch(views, mesh))
        finals.append((as_numpy(state), float(metrics["loss"])))
    (single, loss_1), (sharded, loss_8) = finals
    assert loss_1 == pytest.approx(loss_8, rel=1e-5)
    # Sums over the batch are reduced in another order on 8 devices: each array agrees to 1e-4
    # of its largest entry (the class token's gradient is a sum of cancelling terms).
    for name in single:
        scale = max(float(np.abs(single[name]).max()), 1e-2)
        np.testing.assert_allclose(sharded[name], single[name], rtol=0, atol=1e-4 * scale,
                                   err_msg=name)


@pytest.mark.slow  # ~25 s: a run and its resume
def test_a_vit_run_resumed_from_its_checkpoint_continues_bitwise(tmp_path):
    """Four steps in one go equal two steps, an Orbax checkpoint (frozen arrays included), a
    restore into a differently seeded state and two more steps."""
    config = vit_config(freeze_patch_projection=True)
    config.checkpoint.async_save = False
    batches = [make_views(16, seed) for seed in range(4)]
    _, state, step, mesh = setup(config)
    for views in batches:
        state, _ = step(state, shard_batch(views, mesh))
    uninterrupted = as_numpy(state)

    _, state, step, mesh = setup(config)
    for views in batches[:2]:
        state, _ = step(state, shard_batch(views, mesh))
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(2, state)
    checkpointer.wait_until_finished()
    config.seed += 1  # overwritten by the restore
    _, fresh, step, mesh = setup(config)
    state = Checkpointer(tmp_path, config).restore(2, fresh, replicated_sharding(mesh)).state
    for views in batches[2:]:
        state, _ = step(state, shard_batch(views, mesh))
    resumed = as_numpy(state)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


@pytest.mark.slow  # ~16 s: two trainings compared
def test_bfloat16_vit_tracks_float32_losses_and_keeps_float32_parameters():
    """With the ViT recipe's optimizer (AdamW): losses agree to 3e-2 step by step, as the
    ResNet's do in tests/test_performance.py."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = vit_config()
        config.model.compute_dtype = dtype
        config.optimizer.kind, config.optimizer.base_learning_rate = "adamw", 2e-3
        graphdef, state, step, mesh = setup(config)
        losses[dtype] = []
        for seed in range(4):
            state, metrics = step(state, shard_batch(make_views(16, seed), mesh))
            losses[dtype].append(float(metrics["loss"]))
        merged = nnx.merge(graphdef, state)
        kept = [nnx.state(merged.online), nnx.state(merged.target),
                nnx.state(merged.optimizer.opt_state)]
        assert {x.dtype for x in jax.tree.leaves(kept) if jnp.issubdtype(x.dtype, jnp.floating)
                } == {jnp.dtype("float32")}, dtype
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=3e-2)
    assert losses["float32"][0] != losses["bfloat16"][0]


def test_recipe_is_moco_v3s_byol_setting_each_number_cited():
    """byol_vit_imagenet: MoCo v3 Section 5 (AdamW, batch 4096, lr x batch/256, 40 warm-up
    epochs), Table 4 (300 epochs), Figure 6 (BYOL: lr 1e-4, wd 0.03), Table 2 (12 heads),
    Sections 4.1/6.1 (frozen random patch projection), its code (sin-cos, class token)."""
    config = load_config("byol_vit_imagenet:s16")
    assert config.model.encoder.name == "vit_small" and config.model.encoder.num_heads == 12
    assert config.model.encoder.freeze_patch_projection
    assert (config.model.encoder.position_embedding, config.model.encoder.pooling) == (
        "sincos", "token")
    assert (config.optimizer.kind, config.optimizer.base_learning_rate,
            config.optimizer.weight_decay) == ("adamw", 1e-4, 0.03)
    assert (config.optimizer.adam_b1, config.optimizer.adam_b2, config.optimizer.adam_eps) == (
        0.9, 0.999, 1e-8)
    assert (config.training.batch_size, config.training.epochs,
            config.training.warmup_epochs) == (4096, 300.0, 40.0)
    assert config.optimizer.exclude_bias_and_norm and config.model.compute_dtype == "bfloat16"
    assert (config.model.projector.hidden_size, config.model.projector.output_size) == (4096, 256)
    assert load_config("byol_vit_imagenet:b16").model.encoder.name == "vit_base"
    smoke = load_config("byol_vit_imagenet:s16,smoke=True")
    assert smoke.model.encoder.name == "vit_micro" and smoke.model.encoder.num_heads == 0
    assert smoke.model.compute_dtype == "float32" and smoke.optimizer.kind == "adamw"
    smoke.data.dir = "somewhere"
    validate_config(smoke, num_devices=1)
    smoke.data.image_size = 10  # not a multiple of the 4-px patches of the small stem
    with pytest.raises(ConfigError, match="data.image_size=10 must be a multiple of the ViT"):
        validate_config(smoke, num_devices=1)


def test_image_size_is_tied_to_the_encoders_and_old_records_compare_equal():
    from byol_flax.checkpointing.config_changes import differences

    config = base_config()
    config.data.image_size = 96
    assert config.model.encoder.image_size == 96
    assert json.loads(config.to_json())["model"]["encoder"]["image_size"] == 96
    record = {"config": json.loads(config.to_json())}
    old = json.loads(json.dumps(record))
    for key in ("image_size", "patch_size", "num_heads", "pooling", "position_embedding",
                "freeze_patch_projection"):
        del old["config"]["model"]["encoder"][key]
    for key in ("kind", "adam_b1", "adam_b2", "adam_eps"):
        del old["config"]["optimizer"][key]
    assert differences(old, record) == []


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=900, env={**__import__("os").environ,
                                                         "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # ~40 s: pre-train, export, evaluate
def test_a_tiny_vit_pretrains_on_the_digits_exports_and_is_evaluated(data_dir, tmp_path):
    """The README's command with --config.model.encoder.name=vit_micro, then the export (model
    card) and the linear and kNN protocols on it."""
    workdir, export_dir = tmp_path / "vit", tmp_path / "export"
    run("byol_flax.main", f"--config=digits_cpu:{data_dir},smoke=True",
        "--config.model.encoder.name=vit_micro", f"--workdir={workdir}", cwd=tmp_path)
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert math.isfinite(final["loss"]) and (workdir / "checkpoints" / "8").is_dir()
    assert "knn/top1_k20" in final and "collapse/projection_effective_rank" in final
    run("byol_flax.export", f"--workdir={workdir}", f"--out={export_dir}", cwd=tmp_path)
    card = json.loads((export_dir / "model_card.json").read_text())
    architecture = card["architecture"]
    assert architecture["encoder"]["name"] == "vit_micro" and architecture["encoder"][
        "image_size"] == 8
    # The fixed sin-cos position embedding: (1 + 2 x 2 patches) x 128, counted apart.
    assert architecture["frozen_parameters"] == 5 * 128
    assert "640 more fixed, not trained" in (export_dir / "MODEL_CARD.md").read_text()
    for protocol in ("linear", "knn"):
        out = tmp_path / protocol
        run("byol_flax.evaluation", f"--config=eval_digits:{protocol},data={data_dir},"
            "image_size=8,smoke=True", f"--source={export_dir}", f"--workdir={out}", cwd=tmp_path)
        results = json.loads((out / "results.json").read_text())
        top1 = results["test"]["top1" if protocol == "linear" else "top1_k20"]
        assert results["source"]["kind"] == "export" and 0.1 < top1 <= 1  # above chance


def test_a_batchnorm_final_norm_centres_each_feature_over_the_batch_and_has_no_timm_layout():
    """final_norm="batchnorm": in training, each feature of the representation has batch mean 0
    and std 1 whatever every image shares; in inference it reads the running statistics;
    timm's layout (final LayerNorm) refuses it in one line naming the key."""
    from byol_flax.export import timm_vit

    encoder = micro(final_norm="batchnorm")
    images = jax.random.normal(jax.random.key(0), (64, 16, 16, 3)) + 3.0  # a shared offset
    encoder.train()
    y = np.asarray(encoder(images))
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-2)
    encoder.eval()
    assert not np.allclose(np.asarray(encoder(images)).mean(axis=0), 0.0, atol=1e-2)
    layer = np.asarray(micro()(images))  # timm's LayerNorm keeps the shared part
    shared = np.sum(layer.mean(axis=0) ** 2) / np.mean(np.sum(layer ** 2, axis=1))
    assert shared > 0.5
    with pytest.raises(timm_vit.TimmExportError, match="final_norm='batchnorm'"):
        timm_vit.timm_shapes(encoder)
