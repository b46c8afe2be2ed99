"""Image validation for shard building: fully decode, fix orientation, RGB, downscale, (re-)encode as JPEG.

Every image that enters a shard went through here, so the loader can trust that each `.jpg` member decodes.

Two paths, one verdict. The fast path takes a plain upright YCbCr/RGB JPEG (what product photos almost always are):
its markers are scanned here (EXIF orientation, multi-picture and XMP segments), and libjpeg-turbo decodes it in full
through `simplejpeg` in strict mode, which treats every libjpeg warning (truncated data, corrupt entropy segments) as an
error. Anything else, and anything the fast path stumbles on, goes through the PIL path, which decides every reject
and every reason: the fast path can only accept what PIL accepts (same decoder, stricter), so the set of rejects and
their reasons does not depend on which path looked first.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from mmtrain.data.shards.records import BAD_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE

try:  # libjpeg-turbo straight to numpy; an install dependency, but the PIL path alone is complete without it
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None

DEFAULT_MAX_PIXELS = 64_000_000  # 8k × 8k: anything larger is a decompression bomb, not a product photo
JPEG_QUALITY = 90
EXIF_ORIENTATION = 0x0112
_FAST_COLORSPACES = ("YCbCr", "RGB")  # three components: PIL opens these as mode RGB
_KEEP_BUFFER = 16 << 20  # bytes of decoded pixels a worker keeps between images (2300 × 2300 RGB)
_pixel_buffer = bytearray()


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


def _exif_orientation(data: bytes, start: int, end: int) -> int | None:
    """The Orientation tag of IFD0 in the TIFF structure at data[start:end]; 1 when absent, None when unreadable."""
    if end - start < 8:
        return None
    order = data[start:start + 2]
    if order == b"II":
        byteorder = "little"
    elif order == b"MM":
        byteorder = "big"
    else:
        return None

    def uint(pos: int, size: int) -> int:
        return int.from_bytes(data[start + pos:start + pos + size], byteorder)

    if uint(2, 2) != 42:
        return None
    ifd = uint(4, 4)
    if ifd < 8 or start + ifd + 2 > end:
        return None
    count = uint(ifd, 2)
    if start + ifd + 2 + 12 * count > end:
        return None
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if uint(entry, 2) == EXIF_ORIENTATION:
            if uint(entry + 2, 2) != 3 or uint(entry + 4, 4) != 1:  # not one SHORT: let PIL interpret it
                return None
            return uint(entry + 8, 2)
    return 1


def _plain_jpeg_orientation(data: bytes) -> int | None:
    """Scan the markers before the first scan: the EXIF orientation (1 when none) of a JPEG the fast path may take.

    None (→ the PIL path) for anything else: not a JPEG, a malformed marker, a multi-picture file (PIL opens MPO as
    another format), XMP (PIL reads an orientation from it too), or EXIF this parser does not read the way PIL does.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, size, orientation = 2, len(data), None
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: every header segment has been seen
            return 1 if orientation is None else orientation
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        body, end = pos + 4, pos + 2 + length
        if length < 2 or end > size:
            return None
        if marker == 0xE1:
            if data.startswith(b"Exif\0\0", body, end):
                if orientation is None:  # PIL reads the first EXIF segment only
                    orientation = _exif_orientation(data, body + 6, end)
                    if orientation is None:
                        return None
            elif data.startswith(b"http://ns.adobe.com/xap/1.0/", body, end):
                return None
        elif marker == 0xE2 and data.startswith(b"MPF\0", body, end):
            return None
        pos = end
    return None


def _encode(img: Image.Image, max_side: int, quality: int) -> bytes:
    img = to_rgb(img)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _fast_path(data: bytes, max_side: int, quality: int, max_pixels: int, name: str) -> bytes | None:
    """The result for a plain upright JPEG that decodes strictly, or None to let the PIL path decide."""
    if simplejpeg is None or _plain_jpeg_orientation(data) != 1:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    bomb = Image.MAX_IMAGE_PIXELS  # PIL's own bomb check, with its own message, stays with PIL
    if colorspace not in _FAST_COLORSPACES or (bomb and width * height > bomb):
        return None
    if width * height > max_pixels:
        raise ImageRejected(IMAGE_TOO_LARGE, f"{name}: {width}x{height} exceeds {max_pixels} pixels")
    global _pixel_buffer
    need = width * height * 3
    if len(_pixel_buffer) < need <= _KEEP_BUFFER:  # one buffer per process for the usual sizes: no page faults
        _pixel_buffer = bytearray(need)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True,
                                        buffer=_pixel_buffer if need <= len(_pixel_buffer) else None)
    except ValueError:
        return None
    if max(width, height) <= max_side:
        return data  # already what a shard wants: kept byte for byte, now that it decoded in full
    return _encode(Image.fromarray(pixels), max_side, quality)


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
    fast = _fast_path(data, max_side, quality, max_pixels, name)
    if fast is not None:
        return fast
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
    except Image.UnidentifiedImageError as exc:  # its text names the BytesIO's address: not the same twice
        raise ImageRejected(BAD_IMAGE, f"{name}: cannot identify image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(BAD_IMAGE, f"{name}: {exc}") from exc
    upright = img.getexif().get(EXIF_ORIENTATION, 1) == 1
    if img.format == "JPEG" and img.mode == "RGB" and upright and max(img.size) <= max_side:
        return data
    if not upright:  # phone photos; transposing costs a copy, so only when needed
        img = ImageOps.exif_transpose(img)
    return _encode(img, max_side, quality)
