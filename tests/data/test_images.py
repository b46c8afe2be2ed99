"""Image preprocessing: the tower's settings, exact normalization, no flip unless asked."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmtrain.data.loader.images import CLIP_MEAN, CLIP_STD, ImageConfig, preprocess, resize_image, sample_rng


def jpeg(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    cfg = ImageConfig.from_pretrained(tmp_path)
    assert (cfg.size, cfg.mean, cfg.std, cfg.resize, cfg.augment, cfg.hflip) == (
        336, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "shortest", False, False)
    assert ImageConfig().mean == CLIP_MEAN and ImageConfig().std == CLIP_STD
    with pytest.raises(ValueError):
        ImageConfig(resize="stretch")


def test_normalize_exact_values():
    cfg = ImageConfig(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = preprocess(jpeg(Image.new("RGB", (20, 12), (255, 0, 51))), cfg)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 3, 3], torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (0.2 - 0.5) / 1.0]))


def test_shortest_crops_pad_keeps_whole_image():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 20))  # a white bar at the left edge
    short = np.asarray(resize_image(img, ImageConfig(size=10)))
    assert short.shape == (10, 10, 3) and short[:, 0].max() < 30  # centre crop cut the bar off
    cfg = ImageConfig(size=10, resize="pad", mean=(0.5, 0.5, 0.5))
    padded = np.asarray(resize_image(img, cfg))
    assert padded[:, 0].max() > 200  # the bar survives
    assert tuple(padded[0, 5]) == (128, 128, 128)  # padding is the mean colour (normalizes to 0)


def test_augmentation_off_by_default_and_seeded():
    data = jpeg(Image.effect_noise((32, 32), 60).convert("RGB"))
    base = ImageConfig(size=16)
    assert torch.equal(preprocess(data, base, sample_rng("k", 0, 0)), preprocess(data, base))
    aug = ImageConfig(size=16, augment=True)
    a = preprocess(data, aug, sample_rng("k", 0, 0))
    assert torch.equal(a, preprocess(data, aug, sample_rng("k", 0, 0)))  # same key/epoch/seed → same pixels
    assert not torch.equal(a, preprocess(data, aug, sample_rng("k", 1, 0)))
    text = Image.new("RGB", (32, 32), (0, 0, 0))
    text.paste((255, 255, 255), (0, 0, 8, 32))
    for epoch in range(20):  # no flip without hflip: the left bar stays on the left
        out = preprocess(jpeg(text), aug, sample_rng("t", epoch, 0))
        assert out[0, :, 0].mean() > out[0, :, -1].mean()


def test_batch_normalize_from_decoded_layout_is_identical():
    from mmtrain.data.loader.images import normalize_batch, normalize_hwc_batch

    cfg = ImageConfig(size=6)
    hwc = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    ref = normalize_batch(torch.from_numpy(hwc).permute(0, 3, 1, 2), cfg)
    for given in (torch.from_numpy(hwc), hwc, list(hwc)):
        out = normalize_hwc_batch(given, cfg)
        assert out.shape == (3, 3, 6, 6) and out.is_contiguous() and torch.equal(out, ref)
