"""The BYOL step in plain PyTorch, written the way PyTorch BYOL libraries write it.

A reference for ``benchmarks/train_step.py --compare-torch``: the same network and update as
``byol_flax`` (ResNet v1 with a projection shortcut on the first block of every stage, projector
and predictor Linear 4096 -> BN -> ReLU -> Linear 256, symmetric 2 - 2 cos loss, the target an
EMA copy without gradients, LARS with the paper's exclusions), in the style of byol-pytorch /
solo-learn: ``nn.Module``s, ``copy.deepcopy`` for the target, ``torch._foreach`` EMA, a LARS
``torch.optim.Optimizer``, channels-last tensors, optionally ``torch.compile``.

Vision Transformers (encoder names ``vit_*``, :func:`vit_encoder`): timm's
``VisionTransformer`` (class token after the final norm, no classifier) with MoCo v3's fixed
sin-cos position embedding, as ``byol_flax.models.vit`` builds them by default, and AdamW with
weight decay off for biases, norms, the class token and the position embedding (timm's
``no_weight_decay``, as ``byol_flax.optim`` does), as MoCo v3 trains them.

Not a dependency of the package: install the optional extra ``pip install -e '.[torch]'``
(torch, and timm for the ViTs; pinned in ``pyproject.toml``). Imports neither JAX nor
``byol_flax``: its process's memory is PyTorch's alone.
"""

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BASIC_CHANNELS = (64, 128, 256, 512)
BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)
DEPTHS = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
          101: ((3, 4, 23, 3), True), 152: ((3, 8, 36, 3), True)}


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch, momentum=0.1, eps=1e-5))  # torch momentum 0.1 = decay 0.9


class Block(nn.Module):
    def __init__(self, in_ch: int, channels: int, stride: int, bottleneck: bool,
                 projection: bool):
        super().__init__()
        inner = channels // 4 if bottleneck else channels
        if bottleneck:
            shapes = [(in_ch, inner, 1, 1), (inner, inner, 3, stride), (inner, channels, 1, 1)]
        else:
            shapes = [(in_ch, inner, 3, stride), (inner, channels, 3, 1)]
        self.layers = nn.ModuleList(conv_bn(*shape) for shape in shapes)
        self.shortcut = conv_bn(in_ch, channels, 1, stride) if projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x, inplace=True)
        return F.relu(x + shortcut, inplace=True)


class ResNet(nn.Module):
    def __init__(self, depth: int, stem: str):
        super().__init__()
        blocks_per_stage, bottleneck = DEPTHS[depth]
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        stem_layers = [conv_bn(3, 64, kernel, stride), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            stem_layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem_layers)
        blocks, width = [], 64
        channels_per_stage = BOTTLENECK_CHANNELS if bottleneck else BASIC_CHANNELS
        for stage, (count, channels) in enumerate(zip(blocks_per_stage, channels_per_stage)):
            for index in range(count):
                stride = (1 if stage == 0 else 2) if index == 0 else 1
                blocks.append(Block(width, channels, stride, bottleneck, projection=index == 0))
                width = channels
        self.blocks = nn.Sequential(*blocks)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)


def mlp(in_features: int, hidden: int = 4096, out: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=False))


# name -> (embed_dim, depth, num_heads): byol_flax.models.vit.VIT_SIZES (timm's ViT-Ti/S/B/L;
# vit_micro is byol_flax's CPU-sized net), repeated so that this process does not import JAX;
# benchmarks/train_step.py checks that both sides build the same network.
VIT_SIZES = {"vit_micro": (64, 4, 4), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
VIT_PATCH_SIZE_BY_STEM = {"imagenet": 16, "small": 4}  # byol_flax.models.vit's, for patch_size 0
VIT_NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # timm's VisionTransformer.no_weight_decay()


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """(1, 1 + grid^2, width): MoCo v3's fixed 2-D sin-cos embedding with a zero row for the
    class token, as ``byol_flax.models.vit.sincos_position_embedding`` builds it."""
    quarter = width // 4
    omega = 1.0 / 10_000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    col_angles, row_angles = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    patches = torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(),
                         row_angles.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches])[None]


def vit_encoder(name: str, image_size: int, stem: str, *, num_heads: int = 0,
                freeze_patch_projection: bool = False) -> nn.Module:
    """timm's ViT without classifier (class token after the final LayerNorm), MoCo v3's init and
    fixed sin-cos position embedding: byol_flax.models.vit's defaults for ``name``;
    ``num_heads`` (0: the size's) and ``freeze_patch_projection`` as
    ``model.encoder.num_heads`` and ``model.encoder.freeze_patch_projection``."""
    from timm.models.vision_transformer import VisionTransformer

    width, depth, heads = VIT_SIZES[name]
    patch_size = VIT_PATCH_SIZE_BY_STEM[stem]
    model = VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=width,
                              depth=depth, num_heads=num_heads or heads, num_classes=0,
                              global_pool="token", weight_init="moco")
    with torch.no_grad():
        model.pos_embed.copy_(sincos_position_embedding(image_size // patch_size, width))
    model.pos_embed.requires_grad_(False)  # fixed: no gradient, update, decay or EMA (MoCo v3)
    if freeze_patch_projection:  # MoCo v3's stop-gradient after the random patch projection
        model.patch_embed.requires_grad_(False)
    return model


def build_encoder(name: str, stem: str, image_size: int, **vit_options: Any) -> nn.Module:
    """``resnet<depth>`` or ``vit_<size>``, as byol_flax's encoder registry names them;
    ``vit_options``: :func:`vit_encoder`'s keywords."""
    if name.startswith("vit"):
        return vit_encoder(name, image_size, stem, **vit_options)
    return ResNet(int(name.removeprefix("resnet")), stem)


class OnlineNetwork(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(self.encoder.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class LARS(torch.optim.Optimizer):
    """LARS of Appendix A (the official code's order: decay -> trust ratio -> momentum -> LR).

    Parameter groups with ``exclude=True`` (biases, BatchNorm) get neither weight decay nor the
    trust ratio.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 1.5e-6,
                 momentum: float = 0.9, trust_coefficient: float = 1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                state["momentum"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum"], alpha=-group["lr"])


def lars_param_groups(*modules: nn.Module) -> list[dict]:
    """Biases and BatchNorm parameters (every 1-d tensor here) excluded, as in Appendix A."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "exclude": True}]


def adamw_param_groups(*modules: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay off for biases and norms (every 1-d tensor here) and for timm's
    ``no_weight_decay`` (class token, position embedding), as ``byol_flax.optim`` masks it."""
    named = [(name, p) for m in modules for name, p in m.named_parameters() if p.requires_grad]
    undecayed = [p.ndim <= 1 or name.rsplit(".", 1)[-1] in VIT_NO_WEIGHT_DECAY
                 for name, p in named]
    return [{"params": [p for (_, p), skip in zip(named, undecayed) if not skip],
             "weight_decay": weight_decay},
            {"params": [p for (_, p), skip in zip(named, undecayed) if skip],
             "weight_decay": 0.0}]


def trainable_parameters(*modules: nn.Module) -> int:
    """Scalars the optimizer updates (frozen tensors excluded): the count both sides compare."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=-1)).mean()


class BYOL:
    """Online network, predictor, EMA target and LARS (or AdamW); ``step(view1, view2)`` is one
    update. ResNets take channels-last views (``memory_format``), ViTs timm's contiguous NCHW."""

    def __init__(self, encoder: str = "resnet18", stem: str = "small", image_size: int = 32,
                 optimizer: str = "lars", lr: float = 0.1, weight_decay: float = 1.5e-6,
                 tau: float = 0.996, compile_mode: str | None = None, **vit_options: Any):
        self.memory_format = (torch.contiguous_format if encoder.startswith("vit")
                              else torch.channels_last)
        self.online = OnlineNetwork(build_encoder(encoder, stem, image_size, **vit_options)).to(
            memory_format=self.memory_format)
        self.predictor = mlp(256)
        self.target = copy.deepcopy(self.online)
        # The EMA pairs: the online network's trained tensors (fixed ones stay equal anyway).
        pairs = [(o, t) for o, t in zip(self.online.parameters(), self.target.parameters())
                 if o.requires_grad]
        self.ema_online, self.ema_target = [o for o, _ in pairs], [t for _, t in pairs]
        for p in self.target.parameters():
            p.requires_grad_(False)
        if optimizer == "lars":
            self.optimizer = LARS(lars_param_groups(self.online, self.predictor), lr=lr,
                                  weight_decay=weight_decay)
        elif optimizer == "adamw":  # PyTorch's defaults (betas 0.9/0.999, eps 1e-8), as MoCo v3
            self.optimizer = torch.optim.AdamW(
                adamw_param_groups(self.online, self.predictor, weight_decay=weight_decay),
                lr=lr, fused=True)  # fused: PyTorch's fastest AdamW, CPU included
        else:
            raise ValueError(f"optimizer must be 'lars' or 'adamw', got {optimizer!r}")
        self.trainable_parameters = trainable_parameters(self.online, self.predictor)
        self.tau = tau
        self.forward_online, self.forward_target = self.online, self.target
        if compile_mode is not None:
            self.forward_online = torch.compile(self.online, mode=compile_mode)
            self.forward_target = torch.compile(self.target, mode=compile_mode)

    def step(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        # One pass per view, as solo-learn does and as byol_flax does: BatchNorm statistics are
        # per view (byol-pytorch concatenates the views into one batch instead).
        prediction_1, prediction_2 = (self.predictor(self.forward_online(v))
                                      for v in (view1, view2))
        with torch.no_grad():
            target_1, target_2 = (self.forward_target(v) for v in (view1, view2))
        loss = byol_loss(prediction_1, target_2) + byol_loss(prediction_2, target_1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_target, self.ema_online, 1 - self.tau)
        return loss.detach()
