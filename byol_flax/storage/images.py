"""The one image decoder: explicit formats, never a Pillow plugin that runs a program.

``PIL.Image.open`` without ``formats=`` tries every plugin Pillow has, and its EPS plugin hands
a PostScript file to Ghostscript (``gs``) wherever one is installed, whatever the file's name. The
converters and the training decoder open images here, with only the formats the converters
document (:data:`IMAGE_FORMATS`); anything else is "not a readable image".
"""

import io

from PIL import Image

# Pillow format ids of the files the converters accept (byol_flax.data.convert.image_io's
# IMAGE_EXTENSIONS) and of what they store (JPEG or PNG).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image of the encoded ``data`` (``load()`` decodes the pixels);
    ``PIL.UnidentifiedImageError`` for any format outside :data:`IMAGE_FORMATS`."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
