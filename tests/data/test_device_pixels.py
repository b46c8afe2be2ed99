"""uint8 pixels in the loader's batch, normalized by the trainer on the device: the model gets exactly the pixels the
loader used to normalize on the host. Checked against the old host path (`normalize_hwc_batch`), the per-image
reference (`normalize_batch`) and the images decoded straight from the shards, padded and packed, with and without
a worker (the shared pixel ring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fastpaths import SIZE, loader_config, model_size_shards
from loader_fixtures import tiny_tokenizer

from mmtrain.data.loader.images import (ImageConfig, _normalize_torch, hwc_to_nchw_uint8, normalize_batch,
                                 normalize_hwc_batch, normalize_pixels, preprocess_hwc)
from mmtrain.data.loader.shard_plan import load_shards
from mmtrain.data.loader.tar_index import ShardReader
from mmtrain.data.loader.stream import build_loader
from mmtrain.train.runtime import model_inputs

CFG = ImageConfig(size=SIZE, mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 0.7))


def decoded(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("cfg", [ImageConfig(size=SIZE), CFG])
def test_normalize_pixels_equals_the_host_normalization_exactly(cfg):
    hwc = decoded(5)
    old = normalize_hwc_batch(hwc, cfg)  # what the loader's main process produced before the move
    batch = hwc_to_nchw_uint8(hwc)
    assert batch.dtype == torch.uint8 and batch.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(batch, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    hwc[0] = 0  # the batch owns its pixels: the source (a ring slot) can be reused at once
    assert batch[0].any()
    for got in (normalize_pixels(batch, cfg.mean, cfg.std), normalize_pixels(batch.contiguous(), cfg.mean, cfg.std),
                _normalize_torch(batch, tuple(cfg.mean), tuple(cfg.std))):  # the accelerator path, run on the CPU
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, old)
    assert torch.equal(normalize_batch(batch, cfg), old)  # the per-image reference
    assert normalize_pixels(batch[:0], cfg.mean, cfg.std).shape == (0, 3, SIZE, SIZE)
    with pytest.raises(TypeError):
        normalize_pixels(old, cfg.mean, cfg.std)


def shard_images(data) -> dict[str, list[bytes]]:
    reader, out = ShardReader(), {}
    for shard in load_shards(data):
        for i in range(shard.samples):
            raw = reader.read(shard.path, i)
            out[raw["__key__"]] = [raw[f"{k}.jpg"] for k in range(sum(1 for m in raw if m.endswith(".jpg")))]
    reader.close()
    return out


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_loader_batches_carry_uint8_and_the_trainer_normalizes_them_as_before(tmp_path, workers, packed):
    data = model_size_shards(tmp_path / "s")  # model-size, off-size (resized) and text-only samples
    extra = dict(pack=True, max_length=400, batch_size=2) if packed else {}
    loader = build_loader(loader_config(data, num_workers=workers, image=CFG, **extra), tiny_tokenizer(),
                          rank=0, world_size=1)
    images = shard_images(data)
    batches = list(loader)
    assert len(batches) > 3 and any(len(b["pixel_values"]) for b in batches)
    for batch in batches:
        pixels = batch["pixel_values"]
        assert pixels.dtype == torch.uint8 and pixels.shape == (len(batch["image_slots"]), 3, SIZE, SIZE)
        assert batch["pixel_norm"] == (CFG.mean, CFG.std)
        rows = batch["image_slots"][:, 0].tolist()
        # the images in batch order: each row's samples in order (keys are in placement order), each its images
        expected = [preprocess_hwc(b, CFG) for key in batch["keys"] for b in images[key]]
        assert len(expected) == len(pixels) and rows == sorted(rows)
        if expected:
            assert torch.equal(pixels, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
            old = normalize_hwc_batch(expected, CFG)  # the float batch the loader used to hand out
        else:
            old = torch.zeros((0, *CFG.shape))
        for dtype in (torch.float32, torch.bfloat16):
            inputs = model_inputs(batch, torch.device("cpu"), dtype)
            assert inputs["pixel_values"].dtype == dtype and inputs["pixel_values"].is_contiguous()
            assert torch.equal(inputs["pixel_values"], old.to(dtype))


def test_uint8_pixels_without_their_normalization_are_refused():
    batch = {"input_ids": torch.zeros((1, 8), dtype=torch.long), "pixel_values": hwc_to_nchw_uint8(decoded(1))}
    with pytest.raises(ValueError, match="pixel_norm"):
        model_inputs(batch, torch.device("cpu"), torch.float32)
    floats = dict(batch, pixel_values=normalize_hwc_batch(decoded(1), CFG))  # float pixels pass as before
    assert torch.equal(model_inputs(floats, torch.device("cpu"), torch.float32)["pixel_values"],
                       floats["pixel_values"])
