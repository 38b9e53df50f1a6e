"""The images a converter reads: where each comes from, which files are found, and a full decode.

Bad input: symlinks are followed once by real path (a loop is walked once, a linked duplicate is
converted once). Every image is fully decoded while converting, so a truncated file fails here,
not in training. Undecodable and oversized images and non-UTF-8 file names are left out and listed
in ``skipped_files.json`` next to the manifest (``--on-bad-image=error`` fails on the first one
instead, naming it). Images of more than 8 bits per sample are stored as 8-bit PNG (value >> 8),
since the training decoder's ``convert("RGB")`` would clip them at 255; the manifest counts them.
"""

import dataclasses
import hashlib
import io
import os
import pathlib
import warnings

import numpy as np
from PIL import Image

from byol_flax.data.records import DataError
from byol_flax.storage import files
from byol_flax.storage.images import open_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
REENCODE_CHOICES = ("none", "png", "jpeg")
JPEG_QUALITY = 95
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})
# The largest image converted (width x height). Training decodes every image once per epoch in
# each input worker: 100 Mpx is 300 MB of RGB per decode, and a few such images in flight exhaust a
# host. Pillow itself refuses 2 x 89.5 Mpx as a decompression bomb (a tiny file claiming a huge
# size); this limit is below that, so both are reported the same way.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# The largest image file read (a file, not pixels: a FIFO or /dev/zero named *.jpg never fills
# memory); far above any photograph at the pixel limit above.
MAX_IMAGE_FILE_BYTES = 1 << 30
BAD_IMAGE_CHOICES = ("skip", "error")
# Pillow modes with more than 8 bits per sample ("I" is how Pillow may open a 16-bit PNG). 16-bit
# RGB(A) PNGs are opened as 8-bit RGB(A) by Pillow itself (high byte), so they need nothing.
HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclasses.dataclass(frozen=True)
class Example:
    """One image to write: where its encoded bytes come from (a file or bytes), label and id.

    A file is read in the worker that writes its shard, so planning a million-image tree holds
    only paths in memory.
    """

    id: str
    label: int
    path: str | None = None
    data: bytes | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError(f"example {self.id!r}: give exactly one of path and data")

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return files.read_bytes(self.path, max_bytes=MAX_IMAGE_FILE_BYTES, what="image")
        except OSError as error:
            raise BadImage(self.origin, f"cannot be read ({error})") from error

    @property
    def origin(self) -> str:
        """How errors and the skipped-files list name this example (bytes of odd names escaped)."""
        return printable_path(self.path) if self.path is not None else f"example {self.id!r}"

    def source_fingerprint(self) -> str:
        """Cheap identity of the source bytes for the resume check (size, not a full read)."""
        if self.data is not None:
            return "sha256:" + hashlib.sha256(self.data).hexdigest()
        try:
            return f"size:{os.path.getsize(self.path)}"
        except OSError as error:
            raise DataError(f"cannot read image {self.path}: {error}") from error


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def printable_path(path: os.PathLike | str) -> str:
    """``path`` with non-UTF-8 bytes written as ``\\xff``: safe in JSON and on a console."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")  # a non-UTF-8 byte was decoded as a lone surrogate by os.walk
    except UnicodeEncodeError:
        return False
    return True


class BadImage(DataError):
    """A file that cannot become a record: unreadable, undecodable, oversized or unnamable."""

    def __init__(self, origin: str, reason: str):
        self.origin, self.reason = origin, " ".join(reason.split())  # one line
        super().__init__(f"bad image {origin}: {self.reason} (--on-bad-image=skip leaves such "
                         "files out and lists them)")

    def __reduce__(self):  # raised in a worker process, re-raised in the parent
        return BadImage, (self.origin, self.reason)


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file left out of the conversion and why (``file`` is printable: see printable_path)."""

    file: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """What a conversion does with bad images (skip them or fail) and the size limit."""

    on_bad: str = "skip"
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.on_bad not in BAD_IMAGE_CHOICES:
            raise DataError(f"on-bad-image {self.on_bad!r} is not one of {BAD_IMAGE_CHOICES}")
        if self.max_pixels < 1:
            raise DataError(f"max image pixels {self.max_pixels} must be positive")


class ImageScan:
    """Finds image files under roots, each real file once, and records what it leaves out.

    Symlinks are followed because large trees are often assembled from links, but by real path:
    a directory already walked is not walked again (a link to a parent would loop forever) and a
    file already found is not converted twice (it would be a duplicate, across splits a leak).
    One scan is shared by every split of a conversion.
    """

    def __init__(self, policy: ImagePolicy = ImagePolicy()):
        self.policy = policy
        self.skipped: list[SkippedFile] = []
        self._dirs: set[str] = set()  # real paths of directories walked or to be walked
        self._pending: set[str] = set()  # reserved for a later find()
        self._files: set[str] = set()

    def claim(self, *directories: pathlib.Path, walk_later: bool = False) -> None:
        """Marks directories as part of the conversion, so links to them are not followed.

        A tree's root and its class folders are claimed before any is walked: a link from one
        class folder to another (or to the root) must not pull those images into its class.
        """
        for directory in directories:
            real = os.path.realpath(directory)
            if walk_later and real not in self._dirs:
                self._pending.add(real)
            self._dirs.add(real)

    def _leave_out(self, path: str, reason: str, *, bad: bool = False) -> None:
        if bad and self.policy.on_bad == "error":
            raise BadImage(printable_path(path), reason)
        self.skipped.append(SkippedFile(printable_path(path), reason))

    def _new_dir(self, path: str, *, root: bool = False) -> bool:
        real = os.path.realpath(path)
        if root and real in self._pending:
            self._pending.remove(real)
        elif real in self._dirs:
            self._leave_out(path, f"a link to directory {printable_path(real)}, which is "
                                  "already part of the conversion")
            return False
        self._dirs.add(real)
        return True

    def find(self, root: pathlib.Path, *, recursive: bool = True) -> list[pathlib.Path]:
        """Sorted image files under ``root`` (skipping dot-files), new to this scan."""
        if not self._new_dir(os.fspath(root), root=True):
            return []
        candidates = []
        for directory, subdirs, names in os.walk(root, followlinks=True):
            subdirs[:] = [name for name in sorted(subdirs) if recursive
                          and not name.startswith(".") and self._new_dir(os.path.join(directory,
                                                                                      name))]
            candidates.extend(pathlib.Path(directory, name) for name in names
                              if is_image_file(name))
        found = []
        for path in sorted(candidates):
            text = os.fspath(path)
            real = os.path.realpath(text)
            if not is_utf8(text):
                self._leave_out(text, "file name is not valid UTF-8 (it cannot be a record id)",
                                bad=True)
            elif not os.path.isfile(real):
                self._leave_out(text, f"a link to {printable_path(real)}, which is not a file",
                                bad=True)
            elif real in self._files:
                self._leave_out(text, f"same file as one found already ({printable_path(real)})")
            else:
                self._files.add(real)
                found.append(path)
        return found

    def left_out_under(self, root: pathlib.Path) -> list[SkippedFile]:
        prefix = printable_path(root).rstrip("/") + "/"
        return [s for s in self.skipped if s.file.startswith(prefix)]


def decode_fully(data: bytes, origin: str,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The fully decoded PIL image, or :class:`BadImage` saying why not.

    A header check would let a truncated file through to fail in the middle of training: every
    pixel is decoded here, once.
    """
    with warnings.catch_warnings():  # the size is checked below, against our own limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = open_image(data)
        except Image.DecompressionBombError as error:
            raise BadImage(origin, f"oversized: {error}") from error
        except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ...)
            raise BadImage(origin, f"not a readable image ({type(error).__name__}: {error})"
                           ) from error
        if (pixels := image.width * image.height) > max_pixels:
            raise BadImage(origin, f"oversized: {image.width}x{image.height} = {pixels} pixels, "
                                   f"over the limit of {max_pixels} (--max-image-pixels)")
        try:
            image.load()
        except MemoryError:
            raise
        except Image.DecompressionBombError as error:
            raise BadImage(origin, f"oversized: {error}") from error
        except Exception as error:
            raise BadImage(origin, f"cannot be fully decoded ({type(error).__name__}: {error})"
                           ) from error
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """Samples of more than 8 bits as 8 bits (value >> 8); other images unchanged.

    Pillow's ``convert("L" / "RGB")``, which training's decoder applies, clips them at 255
    instead: a 16-bit image would come out nearly white.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8))


def encode_image(image: Image.Image | np.ndarray, fmt: str) -> bytes:
    """Encodes a PIL image (or an HxW / HxWxC array) as 8-bit PNG or JPEG bytes."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image = to_8bit(image)
    allowed = _PNG_MODES if fmt == "png" else {"L", "RGB"}
    if image.mode not in allowed:
        image = image.convert("RGBA" if fmt == "png" and "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "jpeg" else {}
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def load_image_bytes(example: Example, reencode: str,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[bytes, bool]:
    """(bytes to store, whether a >8-bit image was scaled to 8 bits), after a full decode.

    Bytes are stored as found unless re-encoding is asked for, or the image has more than 8 bits
    per sample: then it is stored as 8-bit PNG (or the asked-for format).
    """
    data = example.read()
    image = decode_fully(data, example.origin, max_pixels)
    high = image.mode in HIGH_BIT_DEPTH_MODES
    if reencode == "none" and not high:
        return data, False
    fmt = "png" if reencode == "none" else reencode
    try:
        return encode_image(image, fmt), high
    except OSError as error:
        raise DataError(f"{example.origin} could not be re-encoded as {fmt}: {error}") from error
