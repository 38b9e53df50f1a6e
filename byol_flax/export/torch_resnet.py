"""The PyTorch twin of :class:`byol_flax.models.resnet.ResNet`, and the loader of
``encoder.safetensors`` (``python -m byol_flax.export --format=torch``).

Attribute names are torchvision's (``conv1``, ``bn1``, ``maxpool``, ``layer1``.., blocks with
``conv1``/``bn1``.. and ``downsample.0``/``downsample.1``, ``avgpool``, ``fc``), so the file's keys
are torchvision's ``resnet*`` state-dict keys without ``fc.*``. The forward pass returns the
representation y (B, D) of NCHW images normalised as in pre-training
(``byol_flax.data.augment.normalize``: ImageNet mean and standard deviation of [0, 1] RGB).

Padding. Our encoder pads as XLA's "SAME" does: for a kernel k and stride s on a side of n
pixels, ``total = max((ceil(n / s) - 1) * s + k - n, 0)`` of which ``total // 2`` go before and
the rest after. For stride 1 and odd k that is k // 2 on both sides, torchvision's padding; for
a strided layer on an even size it is one pixel less before than torchvision's (a 7x7/2 conv:
2 and 3 instead of 3 and 3; a 3x3/2 conv or max-pool: 0 and 1 instead of 1 and 1), which moves
every sampling point of the layer by one pixel. ``padding="same"`` (the default) computes our
padding from the input size at run time and reproduces our features to float rounding;
``padding="symmetric"`` is torchvision's fixed padding (what a stock torchvision ResNet computes
with the same weights), kept for measuring the difference (``docs/pretrained_weights.md``).

This module imports only torch and safetensors (``byol_flax`` and the export command import it
only for the torch format), so it can also be copied into a project without JAX.

Loading checks the file before it spends memory: the architecture in the metadata must lie
within :data:`LIMITS`, the module it describes is first built on PyTorch's ``meta`` device (no
memory) and its state-dict shapes compared with the file's, and every tensor's sha256 is
compared with the one recorded at export time. Each failure is one :class:`ExportFileError`
line naming the file and the key.
"""

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from byol_flax.storage import files, json_files

Padding = Literal["same", "symmetric"]
PADDINGS = ("same", "symmetric")
# As byol_flax.export.torch_format writes them (tests/test_torch_export.py checks they agree).
WEIGHTS_NAME = "encoder.safetensors"
METADATA_KEY = "byol_flax"  # the safetensors metadata entry holding the architecture (JSON)
FORMAT_VERSION = 2  # 2: a sha256 per tensor in the metadata ("checksums")
CHECKSUMS_KEY = "checksums"
# What an architecture read from a file may ask for: the largest networks of the paper (Table 9:
# ResNet-200 2x has 36 blocks in a stage, ResNet-152 3x 2048 x 3 channels) fit within them.
# "parameters" and "width_multiplier" are byol_flax.export.encoder.MAX_PARAMETERS and
# max(byol_flax.models.resnet.WIDTH_MULTIPLIERS), spelled out because this module imports no
# byol_flax (tests/test_torch_export.py checks they agree).
LIMITS = {"stages": 8, "blocks": 64, "channels": 8192, "stem_channels": 512, "in_channels": 16,
          "width_multiplier": 4, "parameters": 600_000_000}


class ExportFileError(ValueError):
    """An ``encoder.safetensors`` is not one this loader reads (damaged, tampered, or not written
    by ``byol_flax.export --format=torch``); the message names the file and the key."""


def tensor_sha256(array: Any) -> str:
    """The sha256 of a NumPy array's (or CPU tensor's) contiguous bytes: what the export records
    per tensor."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of XLA's "SAME" for one side of ``size`` pixels."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
              value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if not (top or bottom or left or right):
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class Conv2d(nn.Conv2d):
    """A bias-free convolution padded as ``padding`` says (the parameter is ``weight``, OIHW)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 padding: Padding):
        super().__init__(in_channels, out_channels, kernel, stride=stride,
                         padding=kernel // 2 if padding == "symmetric" else 0, bias=False)
        self.same = padding == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad_same(x, self.kernel_size, self.stride)
        return super().forward(x)


class MaxPool2d(nn.MaxPool2d):
    """The stem's 3x3/2 max-pool; "same" pads with -inf, as XLA's reduce_window does."""

    def __init__(self, padding: Padding):
        super().__init__(kernel_size=3, stride=2, padding=1 if padding == "symmetric" else 0)
        self.same = padding == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad_same(x, (3, 3), (2, 2), value=-math.inf)
        return super().forward(x)


def _norm(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class Block(nn.Module):
    """A residual block with torchvision's attribute names: ``conv1, bn1, conv2, bn2`` (its
    ``BasicBlock``: two 3x3, stride on the first) or, with ``bottleneck``, ``conv1..3, bn1..3``
    (its ``Bottleneck``: 1x1, 3x3 with the stride as in torchvision's v1.5 and ours, 1x1 to
    ``channels``); ``downsample`` is the projection shortcut."""

    def __init__(self, in_channels: int, channels: int, *, bottleneck: bool, stride: int,
                 projection: bool, eps: float, momentum: float, padding: Padding):
        super().__init__()
        inner = channels // 4 if bottleneck else channels
        shapes = ([(in_channels, inner, 1, 1), (inner, inner, 3, stride), (inner, channels, 1, 1)]
                  if bottleneck else [(in_channels, inner, 3, stride), (inner, channels, 3, 1)])
        for number, (cin, cout, kernel, step) in enumerate(shapes, start=1):
            self.add_module(f"conv{number}", Conv2d(cin, cout, kernel, step, padding))
            self.add_module(f"bn{number}", _norm(cout, eps, momentum))
        self.depth = len(shapes)
        self.relu = nn.ReLU()
        self.downsample = _projection(in_channels, channels, stride, eps, momentum, padding) \
            if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = x
        for number in range(1, self.depth + 1):
            out = getattr(self, f"bn{number}")(getattr(self, f"conv{number}")(out))
            if number < self.depth:
                out = self.relu(out)
        return self.relu(out + shortcut)


def _projection(in_channels: int, channels: int, stride: int, eps: float, momentum: float,
                padding: Padding) -> nn.Sequential:
    return nn.Sequential(Conv2d(in_channels, channels, 1, stride, padding),
                         _norm(channels, eps, momentum))


class ResNet(nn.Module):
    """ResNet v1 torso as :class:`byol_flax.models.resnet.ResNet` builds it, same arguments:
    NCHW normalised images -> representation (B, ``num_features``).

    Every stage's first block has a projection shortcut (``downsample``), as ours does; stage
    ``i`` has stride ``stage_strides[i]`` (default 1, 2, 2, ...). ``eps`` and ``momentum``
    (= 1 - our BatchNorm decay) go to every ``BatchNorm2d``. ``fc`` is ``nn.Identity()``: set
    it to ``nn.Linear(model.num_features, classes)`` for a classifier.
    """

    def __init__(self, *, blocks_per_stage: Sequence[int], stage_channels: Sequence[int],
                 bottleneck: bool, width_multiplier: int = 1, stem: str = "imagenet",
                 stem_channels: int = 64, in_channels: int = 3,
                 stage_strides: Sequence[int] | None = None, eps: float = 1e-5,
                 momentum: float = 0.1, padding: Padding = "same"):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if len(blocks_per_stage) != len(stage_channels):
            raise ValueError("blocks_per_stage and stage_channels must have the same length")
        strides = list(stage_strides) if stage_strides is not None else \
            [1] + [2] * (len(blocks_per_stage) - 1)
        if len(strides) != len(blocks_per_stage):
            raise ValueError("stage_strides and blocks_per_stage must have the same length")
        self.stem = stem
        self.padding = padding
        width = stem_channels * width_multiplier
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = Conv2d(in_channels, width, kernel, stride, padding)
        self.bn1 = _norm(width, eps, momentum)
        self.relu = nn.ReLU()
        self.maxpool = MaxPool2d(padding) if stem == "imagenet" else nn.Identity()
        for stage, (num_blocks, channels) in enumerate(zip(blocks_per_stage, stage_channels)):
            channels *= width_multiplier
            blocks = []
            for index in range(num_blocks):
                blocks.append(Block(width, channels, bottleneck=bottleneck,
                                    stride=strides[stage] if index == 0 else 1,
                                    projection=index == 0, eps=eps, momentum=momentum,
                                    padding=padding))
                width = channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(blocks_per_stage)
        self.num_features = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _check_architecture(arch: Any, path: str) -> None:
    """Types and sizes of the metadata's architecture against :data:`LIMITS`."""
    def fail(key: str, problem: str) -> ExportFileError:
        return ExportFileError(f"{path}: metadata architecture.{key} {problem}")

    if not isinstance(arch, dict):
        raise ExportFileError(f"{path}: metadata 'architecture' is not a mapping")
    integer = lambda value: isinstance(value, int) and not isinstance(value, bool)
    counts = [("blocks_per_stage", LIMITS["blocks"]), ("stage_channels", LIMITS["channels"]),
              ("stage_strides", 2)]
    for key, limit in counts:
        values = arch.get(key)
        if not isinstance(values, list) or not 1 <= len(values) <= LIMITS["stages"] or not all(
                integer(v) and 1 <= v <= limit for v in values):
            raise fail(key, f"must list 1-{LIMITS['stages']} integers in [1, {limit}]")
    if len({len(arch[key]) for key, _ in counts}) != 1:
        raise fail("blocks_per_stage", "stage_channels and stage_strides differ in length")
    for key in ("stem_channels", "in_channels", "width_multiplier"):
        if not integer(arch.get(key)) or not 1 <= arch[key] <= LIMITS[key]:
            raise fail(key, f"must be an integer in [1, {LIMITS[key]}]")
    if arch.get("stem") not in ("imagenet", "small") or not isinstance(arch.get("bottleneck"),
                                                                       bool):
        raise fail("stem", "must be 'imagenet' or 'small' (and bottleneck a boolean)")
    norm = arch.get("batchnorm")
    if not isinstance(norm, dict) or not all(isinstance(norm.get(k), (int, float))
                                             for k in ("eps", "decay")) \
            or not 0 < norm["eps"] < 1 or not 0 <= norm["decay"] <= 1:
        raise fail("batchnorm", "must hold eps in (0, 1) and decay in [0, 1]")


def read_metadata_object(path: str) -> dict[str, Any]:
    """The JSON object under the file's ``byol_flax`` metadata entry: a regular file (never a
    FIFO or device), strict, depth-bounded JSON; :class:`ExportFileError` naming the file
    otherwise."""
    try:
        files.check_regular(path, what="safetensors file")
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except files.StorageError as error:
        raise ExportFileError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportFileError(f"{path}: not a readable safetensors file: "
                              f"{str(error).splitlines()[0] if str(error) else error!r}") from None
    if METADATA_KEY not in metadata:
        raise ExportFileError(f"{path}: no {METADATA_KEY!r} metadata entry: not written by "
                              "byol_flax.export --format=torch")
    try:
        return json_files.loads(metadata[METADATA_KEY], name=f"{path}: metadata "
                                f"{METADATA_KEY!r}", spec=dict)
    except files.StorageError as error:
        raise ExportFileError(str(error)) from None


def read_architecture(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture recorded in an ``encoder.safetensors`` (its metadata, as written by
    :func:`byol_flax.export.torch_format.torch_arrays`), checked against :data:`LIMITS`."""
    path = os.fspath(path)
    architecture = read_metadata_object(path)
    if architecture.get("format_version") != FORMAT_VERSION:
        version = architecture.get("format_version")
        raise ExportFileError(f"{path}: format_version {version!r}, this code reads "
                              f"{FORMAT_VERSION}")
    _check_architecture(architecture.get("architecture"), path)
    if not isinstance(architecture.get(CHECKSUMS_KEY), dict):
        raise ExportFileError(f"{path}: metadata holds no per-tensor checksums")
    return architecture


def build_torch_encoder(architecture: dict[str, Any], *, padding: Padding = "same") -> ResNet:
    """The (randomly initialised) module ``architecture`` (the file's metadata) describes."""
    arch = architecture["architecture"]
    return ResNet(blocks_per_stage=arch["blocks_per_stage"], stage_channels=arch["stage_channels"],
                  bottleneck=arch["bottleneck"], width_multiplier=arch["width_multiplier"],
                  stem=arch["stem"], stem_channels=arch["stem_channels"],
                  in_channels=arch["in_channels"], stage_strides=arch["stage_strides"],
                  eps=arch["batchnorm"]["eps"], momentum=1.0 - arch["batchnorm"]["decay"],
                  padding=padding)


def _file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    with safe_open(path, framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def weights_file(path: str | os.PathLike) -> str:
    """The ``encoder.safetensors`` at ``path`` (the file, or the export directory holding it),
    checked to be a regular file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected an {WEIGHTS_NAME} written by "
                                "byol_flax.export --format=torch")
    if not os.path.isfile(path):
        raise ExportFileError(f"{path} is not a regular file")
    return path


def load_torch_encoder(path: str | os.PathLike, *, padding: Padding = "same") -> ResNet:
    """An ``encoder.safetensors`` (or the export directory holding it) as a ``torch.nn.Module``
    in eval mode: NCHW normalised float32 images -> representation (B, D).

    ``padding="same"`` gives our encoder's features; ``"symmetric"`` gives what a stock
    torchvision ResNet computes with these weights (see the module docstring). The file is
    checked first (module docstring): :class:`ExportFileError` names what does not fit.
    """
    path = weights_file(path)
    architecture = read_architecture(path)
    with torch.device("meta"):  # shapes only: nothing allocated yet
        shapes = {key: tuple(value.shape) for key, value in
                  build_torch_encoder(architecture, padding=padding).state_dict().items()}
    parameters = sum(math.prod(shape) for shape in shapes.values())
    if parameters > LIMITS["parameters"]:
        raise ExportFileError(f"{path}: the architecture has {parameters:,} parameters, more "
                              f"than the {LIMITS['parameters']:,} this loader accepts")
    stored = _file_shapes(path)
    for key in sorted(set(shapes) | set(stored)):
        if shapes.get(key) != stored.get(key):
            raise ExportFileError(f"{path}: tensor {key} is {stored.get(key)} in the file, the "
                                  f"recorded architecture needs {shapes.get(key)}")
    tensors = load_file(path)
    checksums = architecture[CHECKSUMS_KEY]
    for key, tensor in tensors.items():
        if checksums.get(key) != tensor_sha256(tensor):
            raise ExportFileError(f"{path} is damaged: tensor {key} differs from the checksum "
                                  "recorded at export time")
    model = build_torch_encoder(architecture, padding=padding)
    model.load_state_dict(tensors, strict=True)
    return model.eval()
