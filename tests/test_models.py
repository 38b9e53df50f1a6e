"""Encoders and heads against Appendix A, Appendix J.2 and Table 9."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from byol_flax.config import base_config
from byol_flax.models import (
    MLP,
    BatchNormConfig,
    ResNet,
    build_encoder,
    build_online_network,
    count_params,
    target_from_online,
)

# Table 9, "Weights" column: encoder without classifier, in millions.
TABLE_9_WEIGHTS_M = [
    ("resnet50", 1, 24), ("resnet101", 1, 43), ("resnet152", 1, 58), ("resnet200", 1, 63),
    ("resnet50", 2, 94), ("resnet101", 2, 170), ("resnet50", 3, 211), ("resnet152", 2, 232),
    ("resnet200", 2, 250), ("resnet50", 4, 375), ("resnet101", 3, 382), ("resnet152", 3, 522),
]


def abstract_encoder(name: str, width: int, stem: str = "imagenet"):
    """Shapes only: nothing is allocated, so ResNet-152 (3x) costs no memory."""
    return nnx.eval_shape(lambda: build_encoder(name, width_multiplier=width, stem=stem,
                                                rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name,width,millions", TABLE_9_WEIGHTS_M)
def test_encoder_parameter_count_matches_table_9(name, width, millions):
    encoder = abstract_encoder(name, width)
    assert round(count_params(encoder) / 1e6) == millions
    # Appendix A: representation = output of the final average pool, 2048 x width.
    assert encoder.num_features == 2048 * width


@pytest.mark.parametrize("name,features", [("resnet18", 512), ("resnet34", 512)])
def test_basic_block_encoders_have_512_features(name, features):
    assert abstract_encoder(name, 1).num_features == features


def test_stems_imagenet_7x7_stride_2_with_maxpool_and_small_3x3_stride_1():
    imagenet = build_encoder("resnet_tiny", stem="imagenet", rngs=nnx.Rngs(0))
    small = build_encoder("resnet_tiny", stem="small", rngs=nnx.Rngs(0))
    assert imagenet.stem_conv.kernel.shape[:2] == (7, 7) and imagenet.stem_conv.strides == (2, 2)
    assert small.stem_conv.kernel.shape[:2] == (3, 3) and small.stem_conv.strides == (1, 1)

    # Spatial size reaching the last stage: /32 with the ImageNet stem, /8 with the small one.
    def last_stage_hw(stem, size):
        def forward():
            encoder = build_encoder("resnet_tiny", stem=stem, rngs=nnx.Rngs(0))
            x = jax.nn.relu(encoder.stem_norm(encoder.stem_conv(jnp.zeros((2, size, size, 3)))))
            if stem == "imagenet":
                x = nnx.max_pool(x, (3, 3), (2, 2), "SAME")
            for block in encoder.blocks:
                x = block(x)
            return x, encoder(jnp.zeros((2, size, size, 3)))

        last_stage, representation = jax.eval_shape(forward)  # shapes only, nothing compiled
        assert representation.shape == (2, small.num_features)
        return last_stage.shape[1:3]

    assert last_stage_hw("imagenet", 64) == (2, 2)
    assert last_stage_hw("small", 32) == (4, 4)


def test_bottleneck_blocks_put_the_stride_on_the_3x3_conv():
    encoder = abstract_encoder("resnet50", 1)
    for block in encoder.blocks:
        assert len(block.convs) == 3
        assert block.convs[1].kernel.shape[:2] == (3, 3)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_last_batchnorm_scale_of_each_block_follows_zero_init_residual(bottleneck):
    """The paper's results used every BN scale at 1 (official README's batch-normalisation note);
    ``model.encoder.zero_init_residual`` starts the last scale of every block at 0 instead."""
    assert base_config().model.encoder.zero_init_residual is False  # the paper's choice

    def block_scales(zero_init_residual):
        """Per block: (scales of the main-path BNs in order, scale of the shortcut BN or None)."""
        net = ResNet(blocks_per_stage=(2, 1), stage_channels=(16, 32), bottleneck=bottleneck,
                     stem_channels=8, zero_init_residual=zero_init_residual, rngs=nnx.Rngs(0))
        assert np.all(np.asarray(net.stem_norm.scale[...]) == 1)
        return [([np.asarray(n.scale[...]) for n in block.norms],
                 None if block.shortcut_norm is None
                 else np.asarray(block.shortcut_norm.scale[...]))
                for block in net.blocks]

    for main_path, shortcut in block_scales(False):
        assert len(main_path) == (3 if bottleneck else 2)
        assert all(np.all(s == 1) for s in main_path)
        assert shortcut is None or np.all(shortcut == 1)
    for main_path, shortcut in block_scales(True):
        assert np.all(main_path[-1] == 0)
        assert all(np.all(s == 1) for s in main_path[:-1])
        assert shortcut is None or np.all(shortcut == 1)


def test_zero_init_residual_reaches_the_encoder_from_the_config():
    config = base_config()
    config.model.encoder.name = "resnet_tiny"
    config.model.encoder.stem = "small"
    config.model.encoder.zero_init_residual = True
    network = build_online_network(config.model, rngs=nnx.Rngs(0))
    assert all(bool(jnp.all(b.norms[-1].scale[...] == 0)) for b in network.encoder.blocks)
    assert all(bool(jnp.all(b.norms[0].scale[...] == 1)) for b in network.encoder.blocks)


def test_unknown_encoder_names_the_value_and_known_names():
    with pytest.raises(KeyError, match="unknown encoder 'resnet51'.*resnet50"):
        build_encoder("resnet51", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width_multiplier"):
        build_encoder("resnet50", width_multiplier=5, rngs=nnx.Rngs(0))


def test_mlp_matches_appendix_a():
    """Linear(4096) -> BN(decay 0.9, eps 1e-5) -> ReLU -> Linear(256); no BN on the output."""
    mlp = nnx.eval_shape(lambda: MLP(2048, rngs=nnx.Rngs(0)))
    (hidden,), (norm,) = list(mlp.hidden), list(mlp.norms)
    assert hidden.kernel.shape == (2048, 4096) and hidden.bias is not None
    assert isinstance(norm, nnx.BatchNorm)
    assert norm.momentum == 0.9 and norm.epsilon == 1e-5  # Appendix J.1 batchnorm_kwargs
    assert mlp.output.kernel.shape == (4096, 256) and mlp.output.bias is None


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_depth_counts_linear_layers_table_14(depth):
    mlp = MLP(8, hidden_size=16, output_size=4, depth=depth, rngs=nnx.Rngs(0))
    linears = [m for _, m in nnx.iter_graph(mlp) if isinstance(m, nnx.Linear)]
    norms = [m for _, m in nnx.iter_graph(mlp) if isinstance(m, nnx.BatchNorm)]
    assert len(linears) == depth and len(norms) == depth - 1
    assert mlp(jnp.ones((3, 8))).shape == (3, 4)


def test_mlp_output_is_not_batch_normalized():
    mlp = MLP(8, hidden_size=16, output_size=4, rngs=nnx.Rngs(0))
    out = mlp(jax.random.normal(jax.random.key(1), (64, 8)) * 5 + 3)
    # A BN'd output would have per-feature mean 0 and std 1 over the batch.
    assert not jnp.allclose(out.std(axis=0), 1.0, atol=0.05)


def test_target_is_exact_copy_without_predictor_and_shares_no_buffers(config):
    online = build_online_network(config.model, rngs=nnx.Rngs(0))
    target = target_from_online(online)
    assert target.predictor is None
    online_view = nnx.state(online, nnx.Param)
    target_params = nnx.state(target, nnx.Param)
    del online_view["predictor"]
    assert jax.tree.structure(online_view) == jax.tree.structure(target_params)
    for a, b in zip(jax.tree.leaves(online_view), jax.tree.leaves(target_params)):
        assert jnp.array_equal(a, b)
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


def test_online_outputs_have_paper_shapes():
    config = base_config().model
    config.encoder.name = "resnet_tiny"
    net = build_online_network(config, rngs=nnx.Rngs(0))
    out = net(jnp.zeros((2, 32, 32, 3)))
    prediction = net.predict(out["projection"], out["projection"])
    assert out["projection"].shape == (2, 256) and prediction.shape == (2, 256)
    assert isinstance(BatchNormConfig().make(4, rngs=nnx.Rngs(0)), nnx.BatchNorm)
