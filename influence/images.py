"""Opening untrusted image files safely: limits, truncation, colour modes."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from influence.runs import InfluenceError


class BadImage(InfluenceError):
    """An image that cannot be used, with the reason a person can act on."""


@dataclass(frozen=True)
class ImageLimits:
    """What an acceptable image is: large enough to see, small enough not to be a bomb."""

    min_side: int = 32
    max_pixels: int = 64_000_000
    max_bytes: int = 200_000_000
    #: Refuse a file declaring more pixels than this per byte (beyond PLAUSIBLE_PIXELS): a header
    #: that lies about its size, or a bomb; None accepts any ratio.
    max_pixels_per_byte: float | None = None


DEFAULT_LIMITS = ImageLimits()
#: Images this small are decoded whatever their ratio of pixels to bytes (a flat-colour PNG).
PLAUSIBLE_PIXELS = 1_000_000


def open_rgb(source: Path | bytes, limits: ImageLimits = DEFAULT_LIMITS,
             reduce_to: int | None = None) -> Image.Image:
    """Decode a whole image to RGB or raise BadImage; grayscale, CMYK, palette and alpha convert.

    With `reduce_to`, an image whose shortest side is more than twice that is decoded at a
    reduced scale (JPEG's DCT scaling, else `Image.reduce`), its shortest side still at least
    `reduce_to`: what a model resizing to that side needs, at a fraction of the memory.
    """
    name = "upload" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        if len(source) > limits.max_bytes:
            raise BadImage(f"file is {len(source):,} bytes, more than {limits.max_bytes:,}")
        fp: io.BytesIO | Path = io.BytesIO(source)
        size = len(source)
    else:
        if not source.is_file():
            raise BadImage("file not found")
        size = source.stat().st_size
        if size > limits.max_bytes:
            raise BadImage(f"file is {size:,} bytes, more than {limits.max_bytes:,}")
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                check_size(img, limits)
                check_plausible(img, size, limits)
                if reduce_to:
                    img.draft("RGB", (reduce_to, reduce_to))
                img.load()
                if reduce_to and (factor := min(img.size) // reduce_to) >= 2:
                    img = img.reduce(factor)
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except OSError as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    except (ValueError, SyntaxError) as e:
        raise BadImage(f"unreadable image {name}: {e}") from None


def check_size(img: Image.Image, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Raise BadImage for an image too large to decode safely or too small to use."""
    w, h = img.size
    if w * h > limits.max_pixels:
        raise BadImage(f"{w}x{h} pixels is more than {limits.max_pixels:,} "
                       "(possible decompression bomb)")
    if min(w, h) < limits.min_side:
        raise BadImage(f"{w}x{h} is too small (shortest side under {limits.min_side})")


def check_plausible(img: Image.Image, nbytes: int, limits: ImageLimits) -> None:
    """Raise BadImage for a file far too small for the pixels its header declares."""
    pixels = img.size[0] * img.size[1]
    ratio = limits.max_pixels_per_byte
    if ratio is not None and pixels > PLAUSIBLE_PIXELS and pixels > ratio * nbytes:
        raise BadImage(f"{img.size[0]}x{img.size[1]} pixels in {nbytes:,} bytes is implausible "
                       "(a header that lies about its size, or a decompression bomb)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparency is composited on white, as a viewer would show it."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
