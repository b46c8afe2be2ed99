"""The simplejpeg decode path: the same pixels as Pillow's, Pillow for everything it does not take, the same checks.

Train (`preprocess_hwc`) and eval/generate (`decode_image` + `resize_image`) both go through `decode_array`, so they
stay identical; these tests pin that the fast path also equals the Pillow path the loader used before.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from mmtrain.data.loader.images import (ImageConfig, ImageTooLarge, decode_array, decode_image, decode_image_pil,
                                 preprocess_hwc, resize_image, sample_rng)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: something JPEG has to work at, at any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def pil_reference(data: bytes, cfg: ImageConfig, rng: random.Random | None = None) -> np.ndarray:
    """What the loader produced before simplejpeg: Pillow decode + draft, then the shared resize."""
    return np.asarray(resize_image(decode_image_pil(data, draft_size=cfg.size), cfg, rng))


def test_catalog_images_are_pixel_identical(real_catalog):
    names = sorted((real_catalog / "images").iterdir())[:150]
    assert len(names) == 150
    cfg, small = ImageConfig(size=224), ImageConfig(size=96, resize="pad")
    for path in names:
        data = path.read_bytes()
        fast = decode_array(data, draft_size=224)
        assert fast is not None, path  # the catalog's images all take the fast path
        assert np.array_equal(fast, np.asarray(decode_image_pil(data, draft_size=224))), path
        assert np.array_equal(preprocess_hwc(data, cfg), pil_reference(data, cfg)), path
        assert np.array_equal(preprocess_hwc(data, small), pil_reference(data, small)), path
        # eval/generate's path gives the same pixels as training's
        assert np.array_equal(np.asarray(resize_image(decode_image(data, draft_size=224), cfg)),
                              preprocess_hwc(data, cfg)), path


@pytest.mark.parametrize("size", [(224, 224), (300, 200), (460, 1000), (900, 900), (1791, 1792), (2000, 1500),
                                  (449, 449), (100, 50)])
@pytest.mark.parametrize("options", [{"quality": 90}, {"quality": 90, "subsampling": 0},
                                     {"quality": 90, "subsampling": 1}, {"quality": 85, "progressive": True}],
                         ids=["420", "444", "422", "progressive"])
def test_scaled_and_progressive_decodes_match_pillow(size, options):
    """DCT scaling by 1/2, 1/4, 1/8 (Pillow's draft choice), progressive, every chroma subsampling: bit-identical."""
    data = encode(photo(*size, seed=size[0]), **options)
    fast = decode_array(data, draft_size=224)
    assert fast is not None
    assert np.array_equal(fast, np.asarray(decode_image_pil(data, draft_size=224)))
    for cfg in (ImageConfig(size=224), ImageConfig(size=224, resize="pad"), ImageConfig(size=64)):
        assert np.array_equal(preprocess_hwc(data, cfg), pil_reference(data, cfg))
    aug = ImageConfig(size=64, augment=True)
    assert np.array_equal(preprocess_hwc(data, aug, sample_rng("k", 1, 0)),
                          pil_reference(data, aug, sample_rng("k", 1, 0)))


def test_grey_jpeg_takes_fast_path_as_rgb():
    data = encode(photo(300, 240, mode="L"), quality=90)
    fast = decode_array(data, draft_size=224)
    assert fast is not None and fast.shape == (240, 300, 3)
    assert np.array_equal(fast, np.asarray(decode_image_pil(data, draft_size=224)))


@pytest.mark.parametrize("kind", ["png", "cmyk", "rgba-png", "gif"])
def test_other_images_fall_back_to_pillow(kind):
    img = photo(260, 230)
    data = {"png": lambda: encode(img, "PNG"), "cmyk": lambda: encode(img.convert("CMYK"), quality=90),
            "rgba-png": lambda: encode(img.convert("RGBA"), "PNG"), "gif": lambda: encode(img, "GIF")}[kind]()
    assert decode_array(data, draft_size=224) is None
    cfg = ImageConfig(size=224)
    assert np.array_equal(preprocess_hwc(data, cfg), pil_reference(data, cfg))


def test_broken_jpegs_raise_what_pillow_raises():
    """libjpeg-turbo refuses them in strict mode; Pillow then decodes or raises, exactly as before."""
    good = encode(photo(224, 224), quality=90)
    for data, match in ((good[:len(good) // 2], "truncated"), (b"\xff\xd8 not a jpeg at all", "cannot identify")):
        assert decode_array(data, 224) is None
        with pytest.raises(Exception, match=match):
            decode_image_pil(data, 224)
        with pytest.raises(Exception, match=match):
            preprocess_hwc(data, ImageConfig(size=224))


def test_max_pixels_checked_on_the_header_before_decoding():
    data = encode(photo(200, 150), quality=90)
    with pytest.raises(ImageTooLarge, match="header declares 200x150 = 30000 pixels > max_image_pixels 10000"):
        decode_array(data, 224, max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="200x150 = 30000 pixels"):
        preprocess_hwc(data, ImageConfig(size=32), max_pixels=10_000)
    assert preprocess_hwc(data, ImageConfig(size=32), max_pixels=30_000).shape == (32, 32, 3)


def test_pillow_bomb_limit_still_applies(monkeypatch):
    """Past Pillow's own MAX_IMAGE_PIXELS the image goes to Pillow, which warns (or raises past twice that)."""
    data = encode(photo(120, 100), quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert decode_array(data, 224) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombWarning):
            preprocess_hwc(data, ImageConfig(size=32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with pytest.raises(Image.DecompressionBombError):
        preprocess_hwc(data, ImageConfig(size=32))
