"""What the PyTorch export's two layouts share (:mod:`byol_flax.export.torch_format` for
ResNets, :mod:`byol_flax.export.timm_vit` for Vision Transformers): the file's name, its metadata
key and format version, the input it expects, and its error."""

from byol_flax.errors import UserError

WEIGHTS_NAME = "encoder.safetensors"
METADATA_KEY = "byol_flax"
FORMAT_VERSION = 2  # 2: a sha256 per tensor under "checksums" (the loaders verify them)
INPUT_NOTE = ("NCHW float32 RGB, x/255 normalised with ImageNet mean (0.485, 0.456, 0.406) and "
              "std (0.229, 0.224, 0.225), as byol_flax.data.augment.normalize")


class TorchExportError(UserError, ValueError):
    """The encoder cannot be written in a PyTorch layout (torchvision ResNet, timm ViT)."""
