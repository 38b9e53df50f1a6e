"""The BYOL step in plain PyTorch, written the way PyTorch BYOL libraries write it.

A reference for ``benchmarks/train_step.py --compare-torch``: the same network and update as
``byol_flax`` (ResNet v1 with a projection shortcut on the first block of every stage, projector
and predictor Linear 4096 -> BN -> ReLU -> Linear 256, symmetric 2 - 2 cos loss, the target an
EMA copy without gradients, LARS with the paper's exclusions), in the style of byol-pytorch /
solo-learn: ``nn.Module``s, ``copy.deepcopy`` for the target, ``torch._foreach`` EMA, a LARS
``torch.optim.Optimizer``, channels-last tensors, optionally ``torch.compile``.

Not a dependency of the package: install the optional extra ``pip install -e '.[torch]'``
(pins the CPU build ``torch==2.13.0``).
"""

import copy
from collections.abc import Iterable

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


class OnlineNetwork(nn.Module):
    def __init__(self, depth: int, stem: str):
        super().__init__()
        self.encoder = ResNet(depth, stem)
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
    params = [p for m in modules for p in m.parameters()]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "exclude": True}]


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=-1)).mean()


class BYOL:
    """Online network, predictor, EMA target and LARS; ``step(view1, view2)`` is one update."""

    def __init__(self, depth: int = 18, stem: str = "small", lr: float = 0.1,
                 tau: float = 0.996, compile_mode: str | None = None):
        self.online = OnlineNetwork(depth, stem).to(memory_format=torch.channels_last)
        self.predictor = mlp(256)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.optimizer = LARS(lars_param_groups(self.online, self.predictor), lr=lr)
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
            online, target = list(self.online.parameters()), list(self.target.parameters())
            torch._foreach_lerp_(target, online, 1 - self.tau)
        return loss.detach()
