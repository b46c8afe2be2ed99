"""Image validation for shard building: fully decode, fix orientation, RGB, downscale, (re-)encode as JPEG.

Every image that enters a shard went through here, so the loader can trust that each `.jpg` member decodes.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from mmtrain.data.records import BAD_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE

DEFAULT_MAX_PIXELS = 64_000_000  # 8k × 8k: anything larger is a decompression bomb, not a product photo
JPEG_QUALITY = 90
EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """An image that cannot go into a shard; `reason` is a reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparent areas composited on white (product cut-outs are usually on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def reencode_image(source: str | Path | bytes, max_side: int, quality: int = JPEG_QUALITY,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Decode `source` completely and return RGB JPEG bytes whose long side is at most `max_side` (never upscaled).

    A file that already is an upright RGB JPEG within `max_side` is returned byte for byte once it has decoded fully:
    re-encoding it would only lose quality and double its size.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageRejected(MISSING_IMAGE, f"{name}: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(IMAGE_TOO_LARGE, f"{name}: {width}x{height} exceeds {max_pixels} pixels")
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(IMAGE_TOO_LARGE, f"{name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageRejected(BAD_IMAGE, f"{name}: {exc}") from exc
    upright = img.getexif().get(EXIF_ORIENTATION, 1) == 1
    if img.format == "JPEG" and img.mode == "RGB" and upright and max(img.size) <= max_side:
        return data
    if not upright:  # phone photos; transposing costs a copy, so only when needed
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()
