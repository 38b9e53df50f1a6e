"""Vision Transformer encoders f (Dosovitskiy et al., 2021) for BYOL, as MoCo v3 trains them.

Layout is timm's ``VisionTransformer`` (so the PyTorch export is a renaming,
:mod:`byol_flax.export.timm_vit`): a patch projection (a p x p / p convolution, written as one
matmul over the flattened patches), a class token, a position embedding added to every token,
pre-LayerNorm blocks (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, fused ``qkv`` projection,
exact-erf GELU, MLP 4x wide), LayerNorm eps 1e-6. The representation y is

* ``pooling="token"`` (MoCo v3, timm's default): the class token after the final LayerNorm;
* ``pooling="mean"``: the mean of the patch tokens, then the final LayerNorm (timm's ``avg``
  pooling with its ``fc_norm``).

``final_norm="batchnorm"`` replaces the final LayerNorm by a BatchNorm over the pooled token
(the encoder's ``bn`` settings; not timm's layout, so no timm export): a LayerNorm normalises
each image's vector on its own and keeps what every image shares (on the digits, 99.8% of the
class token's energy after BYOL: docs/demo_calibration.md), which a ResNet's BatchNorms remove
at every layer; the BatchNorm centres and scales each feature over the batch, as the ResNet's
last BatchNorm does, so the paper's linear probe reads the representation as it reads a
ResNet's.

MoCo v3's stability measures are options: a fixed 2-D sin-cos position embedding
(``position_embedding="sincos"``, the default; ``"learned"`` is timm's trained one) and a
frozen random patch projection (``freeze_patch_projection``). Frozen arrays are
:class:`FrozenParam`: part of the module, its checkpoints and exports, but not an ``nnx.Param``,
so they get no gradient, no optimizer update, no weight decay and no EMA.

Initialisation follows MoCo v3's ``vits.py``: Xavier-uniform Linear kernels (the fused ``qkv``
as three D x D matrices), zero biases, the patch projection Xavier-uniform over its flattened
(p * p * 3, D) shape, the class token N(0, 1e-6), a learned position embedding N(0, 0.02).

``num_heads`` (0: the size's, timm's) changes the attention heads, not the parameter shapes.
The ResNet keys of ``config.model.encoder`` keep a meaning: ``stem`` picks the patch size when
``patch_size`` is 0 (``"imagenet"``: 16 px, ViT-*/16; ``"small"``: 4 px for images of 32 px or
less, as the CIFAR ViTs do) and ``width_multiplier`` multiplies the token width D (the heads
stay, so each head widens).
"""

import functools
import math
from typing import Any, Literal

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from byol_flax.models.resnet import BatchNormConfig

Pooling = Literal["token", "mean"]
PositionEmbedding = Literal["sincos", "learned"]
FinalNorm = Literal["layernorm", "batchnorm"]
POOLINGS = ("token", "mean")
POSITION_EMBEDDINGS = ("sincos", "learned")
FINAL_NORMS = ("layernorm", "batchnorm")
# Patch side when model.encoder.patch_size is 0, by model.encoder.stem.
PATCH_SIZE_BY_STEM = {"imagenet": 16, "small": 4}
LAYER_NORM_EPS = 1e-6  # timm's and MoCo v3's ViT LayerNorm
MLP_RATIO = 4
SINCOS_TEMPERATURE = 10_000.0  # MoCo v3's build_2d_sincos_position_embedding
CLS_TOKEN_STD = 1e-6  # MoCo v3: nn.init.normal_(self.cls_token, std=1e-6)
LEARNED_POSITION_STD = 0.02  # timm: trunc_normal_(self.pos_embed, std=.02)

XAVIER_UNIFORM = jax.nn.initializers.xavier_uniform()


def effective_patch_size(stem: str, patch_size: int) -> int:
    """``model.encoder.patch_size``, or the stem's when it is 0."""
    return patch_size or PATCH_SIZE_BY_STEM[stem]


class FrozenParam(nnx.Variable):
    """A weight that is part of the model but not trained: the fixed sin-cos position embedding
    and, with ``freeze_patch_projection``, the random patch projection (MoCo v3)."""


def qkv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """MoCo v3's init of the fused (D, 3D) ``qkv`` kernel: Xavier-uniform as three D x D."""
    fan_in, fan_out = shape[0], shape[1] // 3
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def sincos_position_embedding(grid: tuple[int, int], width: int) -> jax.Array:
    """(1 + rows * cols, width): a zero row for the class token, then for the patch at (r, c)
    ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with w = 1 / 10000^(i / (width/4)), MoCo v3's
    fixed embedding."""
    if width % 4:
        raise ValueError(f"a sin-cos position embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / SINCOS_TEMPERATURE ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
    rows, cols = jnp.meshgrid(jnp.arange(grid[0], dtype=jnp.float32),
                              jnp.arange(grid[1], dtype=jnp.float32), indexing="ij")
    col_angles = cols.reshape(-1, 1) * omega
    row_angles = rows.reshape(-1, 1) * omega
    patches = jnp.concatenate([jnp.sin(col_angles), jnp.cos(col_angles),
                               jnp.sin(row_angles), jnp.cos(row_angles)], axis=1)
    return jnp.concatenate([jnp.zeros((1, width), jnp.float32), patches], axis=0)


class Attention(nnx.Module):
    """Multi-head self-attention with timm's fused ``qkv`` and output ``proj`` layers.

    Computed in the form XLA:CPU runs fastest (``benchmarks/vit_forms.py`` against the earlier
    forms; docs/performance.md) and equal to timm's up to float rounding
    (``tests/test_timm_vit.py``): q, k and v each come from their third of the ``qkv`` kernel
    straight in the (batch, heads, tokens, head width) layout, so no split of a fused output is
    copied and its gradient is not padded back three times; the softmax's normalisation divides the
    (tokens x head width) output instead of the (tokens x tokens) scores, as flash attention
    does; and ``proj`` contracts the heads without a transpose back.
    """

    def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"ViT width {width} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.dtype = dtype
        self.qkv = nnx.Linear(width, 3 * width, kernel_init=qkv_init, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(width, width, kernel_init=XAVIER_UNIFORM, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # nnx.Linear's: the module's dtype, else the promotion of the input's and the kernel's.
        dtype = self.dtype or jnp.promote_types(x.dtype, self.qkv.kernel[...].dtype)
        x = x.astype(dtype)
        width, heads = x.shape[-1], self.num_heads
        head_width = width // heads
        # timm's fused kernel's columns are (q | k | v), each (heads, head width).
        qkv_kernel = self.qkv.kernel[...].astype(dtype).reshape(width, 3, heads, head_width)
        qkv_bias = self.qkv.bias[...].astype(dtype).reshape(3, heads, 1, head_width)
        q, k, v = (jnp.einsum("btd,dnh->bnth", x, qkv_kernel[:, i]) + qkv_bias[i]
                   for i in range(3))
        attended = attention_core(q, k, v)
        proj_kernel = self.proj.kernel[...].astype(dtype).reshape(heads, head_width, width)
        return (jnp.einsum("bnth,nhd->btd", attended, proj_kernel)
                + self.proj.bias[...].astype(dtype))


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head width)) v over (batch, heads, tokens, head width), the softmax
    normalised after the value product (flash attention's order: a division of the
    tokens x head width output, not of the tokens x tokens scores)."""
    with jax.named_scope("attention_core"):  # named for benchmarks/step_profile.py
        scores = jnp.einsum("bnqh,bnkh->bnqk", q * q.shape[-1] ** -0.5, k)
        # The softmax's shift changes nothing but the range of exp: no gradient through it.
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        return jnp.einsum("bnqk,bnkh->bnqh", weights, v) / weights.sum(-1, keepdims=True)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x Phi(x), in timm's (PyTorch's) erf form.

    ``jax.nn.gelu(approximate=False)`` is the same function through erfc, which XLA:CPU
    computes with an exp and selects (94 of the vit_micro step's 1055 traced ms against 23
    through erf). The derivative is given whole, Phi(x) + x phi(x) (:func:`_gelu_jvp`):
    differentiated term by term, the backward pass added the product rule's two terms as
    separate passes over the MLP's widest activations.
    """
    with jax.named_scope("gelu"):
        return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@gelu.defjvp
def _gelu_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
              ) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    with jax.named_scope("gelu"):
        cdf = _normal_cdf(x)
        pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return x * cdf, (cdf + x * pdf) * dx


class Block(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        norm = functools.partial(nnx.LayerNorm, width, epsilon=LAYER_NORM_EPS, dtype=dtype,
                                 rngs=rngs)
        linear = functools.partial(nnx.Linear, kernel_init=XAVIER_UNIFORM, dtype=dtype, rngs=rngs)
        self.norm1 = norm()
        self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = norm()
        self.fc1 = linear(width, MLP_RATIO * width)
        self.fc2 = linear(MLP_RATIO * width, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("layer_norm"):  # named for benchmarks/step_profile.py
            normed = self.norm1(x)
        x = x + self.attn(normed)
        with jax.named_scope("layer_norm"):
            normed = self.norm2(x)
        return x + self.fc2(gelu(self.fc1(normed)))


class VisionTransformer(nnx.Module):
    """ViT torso without classifier: images (B, H, W, 3) -> representation y (B, D).

    The position embedding is built for ``image_size``; other sizes are an error (the
    evaluation protocols feed the pre-training crop size).
    """

    # Leaves excluded from weight decay besides those named ``bias`` and normalisation
    # parameters: the patch projection's bias, and timm's ``no_weight_decay`` (class token,
    # position embedding). byol_flax.optim reads this attribute.
    no_weight_decay = ("patch_bias", "cls_token", "position_embedding")

    def __init__(self, *, width: int, depth: int, heads: int, num_heads: int = 0,
                 width_multiplier: int = 1,
                 stem: str = "imagenet", patch_size: int = 0, image_size: int = 224,
                 pooling: Pooling = "token", position_embedding: PositionEmbedding = "sincos",
                 freeze_patch_projection: bool = False, final_norm: FinalNorm = "layernorm",
                 in_channels: int = 3, bn: Any = None, dtype: Any = None, rngs: nnx.Rngs):
        if stem not in PATCH_SIZE_BY_STEM:
            raise ValueError(f"encoder stem must be one of {list(PATCH_SIZE_BY_STEM)}, "
                             f"got {stem!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"ViT pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if final_norm not in FINAL_NORMS:
            raise ValueError(f"ViT final_norm must be one of {list(FINAL_NORMS)}, "
                             f"got {final_norm!r}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"ViT position_embedding must be one of "
                             f"{list(POSITION_EMBEDDINGS)}, got {position_embedding!r}")
        patch_size = effective_patch_size(stem, patch_size)
        if image_size % patch_size:
            raise ValueError(f"ViT patch size {patch_size} does not tile {image_size}-px images")
        width *= width_multiplier
        num_heads = num_heads or heads
        self.patch_size, self.image_size, self.pooling = patch_size, image_size, pooling
        self.grid = (image_size // patch_size,) * 2
        self.num_features, self.depth, self.num_heads = width, depth, num_heads
        self.position_embedding_kind = position_embedding
        self.dtype = dtype
        patch_dim = patch_size * patch_size * in_channels
        projection = XAVIER_UNIFORM(rngs.params(), (patch_dim, width))
        projection_type = FrozenParam if freeze_patch_projection else nnx.Param
        self.patch_kernel = projection_type(projection)
        self.patch_bias = projection_type(jnp.zeros((width,), jnp.float32))
        self.cls_token = nnx.Param(CLS_TOKEN_STD * jax.random.normal(rngs.params(), (1, width)))
        tokens = 1 + self.grid[0] * self.grid[1]
        if position_embedding == "sincos":
            self.position_embedding = FrozenParam(sincos_position_embedding(self.grid, width))
        else:
            self.position_embedding = nnx.Param(LEARNED_POSITION_STD * jax.random.truncated_normal(
                rngs.params(), -2.0, 2.0, (tokens, width)))
        self.blocks = nnx.List([Block(width, num_heads, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.final_norm = final_norm
        if final_norm == "batchnorm":  # the encoders' BatchNorm settings (Appendix J.1's)
            self.norm = (bn or BatchNormConfig()).make(width, rngs=rngs, dtype=dtype)
        else:
            self.norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)

    def patches(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, tokens, p * p * C), rows then columns, each patch (p, p, C)
        flattened: the order of a p x p / p convolution's HWIO kernel flattened."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size}-px images (its position "
                             f"embedding), got {images.shape[1]}x{images.shape[2]}")
        return einops.rearrange(images, "b (r p) (c q) ch -> b (r c) (p q ch)",
                                p=self.patch_size, q=self.patch_size)

    def __call__(self, images: jax.Array) -> jax.Array:
        dtype = self.dtype or images.dtype
        x = self.patches(images).astype(dtype) @ self.patch_kernel[...].astype(dtype)
        x = x + self.patch_bias[...].astype(dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dtype)
        for block in self.blocks:
            x = block(x)
        # A LayerNorm of every token then the class token's equals the class token's LayerNorm;
        # a BatchNorm normalises the pooled vector over the batch.
        pooled = x[:, 0] if self.pooling == "token" else jnp.mean(x[:, 1:], axis=1)
        return self.norm(pooled)


def unfreeze_patch_projection(encoder: nnx.Module) -> bool:
    """Makes a ViT's frozen random patch projection trainable (``nnx.Param``), in place; True
    when there was one. MoCo v3 freezes it for pre-training only and fine-tunes every
    parameter; the fixed sin-cos position embedding stays fixed."""
    if not isinstance(encoder, VisionTransformer):
        return False
    frozen = [name for name in ("patch_kernel", "patch_bias")
              if isinstance(getattr(encoder, name), FrozenParam)]
    for name in frozen:
        setattr(encoder, name, nnx.Param(getattr(encoder, name)[...]))
    return bool(frozen)


# name -> (width D, depth, heads): timm's vit_{tiny,small,base,large}_patch16_224 (its ViT-S has 6
# heads; MoCo v3's has 12, which model.encoder.num_heads sets); "vit_micro" is a CPU-sized net
# (tests, the digits) on the same code path, as resnet_tiny is for ResNets.
VIT_SIZES = {"vit_micro": (64, 4, 4), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
