"""Image validation: the simplejpeg fast path and the PIL path give the same verdicts, reasons and bytes."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmtrain.data.shards import image_encoding
from mmtrain.data.shards.image_encoding import ImageRejected, reencode_image
from mmtrain.data.shards.records import BAD_IMAGE, IMAGE_TOO_LARGE, MISSING_IMAGE


def _photo(size=(64, 48), **save) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = (200, 30, 30)  # a left half that shows which way is up
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85, **save)
    return buf.getvalue()


def _with_segment(data: bytes, marker: int, body: bytes) -> bytes:
    """`data` with one more marker segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + data[2:]


def _exif(orientation: int, byteorder: str) -> bytes:
    fmt = "<" if byteorder == "II" else ">"
    tiff = byteorder.encode() + struct.pack(fmt + "HI", 42, 8)
    tiff += struct.pack(fmt + "H", 1) + struct.pack(fmt + "HHI", 0x0112, 3, 1) + struct.pack(fmt + "HH", orientation, 0)
    return b"Exif\0\0" + tiff + struct.pack(fmt + "I", 0)


def _both_paths(monkeypatch, source, *args, **kw):
    """(fast-path result, PIL-only result): each bytes, or the ImageRejected's (reason, message)."""
    out = []
    for module in (image_encoding.simplejpeg, None):
        monkeypatch.setattr(image_encoding, "simplejpeg", module)
        try:
            out.append(reencode_image(source, *args, **kw))
        except ImageRejected as exc:
            out.append((exc.reason, re.sub(r" at 0x[0-9a-f]+", "", str(exc))))  # PIL names a BytesIO by address
    return out


def test_the_fast_path_alone_decides_plain_jpegs() -> None:
    """simplejpeg (install_requires) takes an upright JPEG without PIL: kept byte for byte when small enough, else
    re-encoded to the long side; a rotated one is left to the PIL path (None)."""
    data = _photo()
    assert image_encoding._fast_path(data, 64, 90, 10**8, "a.jpg") is data
    with Image.open(io.BytesIO(image_encoding._fast_path(data, 32, 90, 10**8, "a.jpg"))) as small:
        assert small.size == (32, 24)
    rotated = _with_segment(data, 0xE1, _exif(6, "II"))
    assert image_encoding._fast_path(rotated, 64, 90, 10**8, "a.jpg") is None


def test_upright_rgb_jpeg_within_size_passes_byte_for_byte(monkeypatch) -> None:
    data = _photo()
    fast, slow = _both_paths(monkeypatch, data, 64)
    assert fast is data and slow == data


@pytest.mark.parametrize("max_side", [32, 47])
def test_downscaled_bytes_equal_to_the_pil_path(monkeypatch, max_side: int) -> None:
    fast, slow = _both_paths(monkeypatch, _photo(), max_side)
    assert fast == slow
    assert max(Image.open(io.BytesIO(fast)).size) == max_side


@pytest.mark.parametrize("byteorder", ["II", "MM"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_read_as_pil_reads_it(monkeypatch, orientation: int, byteorder: str) -> None:
    data = _with_segment(_photo(), 0xE1, _exif(orientation, byteorder))
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation
    assert image_encoding._plain_jpeg_orientation(data) == orientation
    fast, slow = _both_paths(monkeypatch, data, 64)
    assert fast == slow
    assert (fast is data) == (orientation == 1)
    if orientation in (6, 8):  # rotated a quarter turn: width and height swap
        assert Image.open(io.BytesIO(fast)).size == (48, 64)


@pytest.mark.parametrize("kind", ["xmp", "mpf", "bad_exif", "gray", "cmyk", "png", "rgba_png"])
def test_other_inputs_take_the_pil_path_with_the_same_result(monkeypatch, kind: str) -> None:
    if kind == "xmp":
        data = _with_segment(_photo(), 0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta tiff:Orientation=\"6\"/>")
    elif kind == "mpf":
        data = _with_segment(_photo(), 0xE2, b"MPF\0II*\0\x08\0\0\0\0\0")
    elif kind == "bad_exif":
        data = _with_segment(_photo(), 0xE1, b"Exif\0\0XX")
    else:
        img = Image.fromarray(np.asarray(Image.open(io.BytesIO(_photo()))))
        img = {"gray": img.convert("L"), "cmyk": img.convert("CMYK"), "png": img,
               "rgba_png": img.convert("RGBA")}[kind]
        buf = io.BytesIO()
        img.save(buf, format="PNG" if "png" in kind else "JPEG")
        data = buf.getvalue()
    if kind in ("xmp", "mpf", "bad_exif"):
        assert image_encoding._plain_jpeg_orientation(data) is None
    fast, slow = _both_paths(monkeypatch, data, 64)
    assert fast == slow
    out = Image.open(io.BytesIO(fast))
    assert out.format == "JPEG" and out.mode == "RGB"


def test_truncated_and_non_images_rejected_with_the_same_reasons(monkeypatch, tmp_path: Path) -> None:
    data = _photo((300, 200))
    for bad in (data[: len(data) // 2], data[:600], b"this is not an image", data[:2] + b"\xff\xe1\x00"):
        fast, slow = _both_paths(monkeypatch, bad, 448)
        assert fast == slow and fast[0] == BAD_IMAGE
    fast, slow = _both_paths(monkeypatch, data, 448, max_pixels=300 * 200 - 1)
    assert fast == slow and fast[0] == IMAGE_TOO_LARGE
    fast, slow = _both_paths(monkeypatch, tmp_path / "missing.jpg", 448)
    assert fast == slow and fast[0] == MISSING_IMAGE


def test_corrupt_data_pil_tolerates_is_still_accepted(monkeypatch) -> None:
    """libjpeg warnings (here: extraneous bytes before EOI) fail the strict fast path; PIL's verdict stands."""
    data = _photo()
    corrupt = data[:-2] + b"\x00\x01\x02" + data[-2:]
    with pytest.raises(ValueError):
        image_encoding.simplejpeg.decode_jpeg(corrupt, strict=True)
    fast, slow = _both_paths(monkeypatch, corrupt, 64)
    assert fast == slow == corrupt


def test_pixel_buffer_reuse_keeps_results_independent(monkeypatch) -> None:
    small, large = _photo((40, 30)), _photo((120, 90))
    first = reencode_image(large, 60)
    reencode_image(small, 20)
    assert reencode_image(large, 60) == first
