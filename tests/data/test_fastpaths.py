"""The loader's fast paths give exactly what the slow paths give: decoding into the shared pixel ring, the ring's
positions and carried images, the token cache, the json shortcut, chunked tar header walks and whole-batch
normalization. Each test compares the fast path with the plain one, value for value."""

from __future__ import annotations

import io
import json
import random
import types

import numpy as np
import pytest
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext
from loader_fixtures import make_conversation, tiny_tokenizer
from PIL import Image

from mmtrain.data.loader import slot, tar_index
from mmtrain.data.loader.images import ImageConfig, decode_array, normalize_batch, normalize_hwc_batch, preprocess_hwc
from mmtrain.data.loader.pixel_buffers import PREFETCH, PixelRing, RingWriter
from mmtrain.data.loader.bad_samples import BadSample, load_image
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.stream import StreamDataset, build_loader
from mmtrain.data.shards.tar_members import end_of_archive, tar_member
from mmtrain.data.loader.templates import Renderer, batch_encoder
from mmtrain.data.loader.token_cache import TokenCache

SIZE = 32


def jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB", **kw) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x * y + seed) % 256], -1)
    img = Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


IMAGES = {
    "model size 4:2:0": jpeg(SIZE, SIZE, 1, quality=90),
    "model size 4:4:4": jpeg(SIZE, SIZE, 2, quality=90, subsampling=0),
    "model size progressive": jpeg(SIZE, SIZE, 3, quality=85, progressive=True),
    "model size grey": jpeg(SIZE, SIZE, 4, mode="L"),
    "model size cmyk (Pillow)": jpeg(SIZE, SIZE, 5, mode="CMYK"),
    "model size png (Pillow)": jpeg(SIZE, SIZE, 6, format="PNG"),
    "larger (scaled, cropped)": jpeg(3 * SIZE + 5, 2 * SIZE + 1, 7),
    "smaller (upscaled)": jpeg(SIZE - 7, SIZE + 3, 8),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("augment", [False, True])
def test_decoding_into_a_buffer_gives_the_same_pixels(name, augment):
    data, cfg = IMAGES[name], ImageConfig(size=SIZE, augment=augment)
    rng = (lambda: random.Random("k:0")) if augment else (lambda: None)
    out = np.full((SIZE, SIZE, 3), 7, dtype=np.uint8)
    got = preprocess_hwc(data, cfg, rng(), out=out)
    assert got is out
    assert np.array_equal(out, preprocess_hwc(data, cfg, rng()))
    shard = load_image(data, cfg, rng(), 10**8, "s.tar", "k", 0, out=np.zeros_like(out))
    assert np.array_equal(shard, out)


def test_model_size_jpeg_is_decoded_in_place():
    data = IMAGES["model size 4:2:0"]
    out = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    assert decode_array(data, SIZE, out=out) is out and out.any()
    assert np.array_equal(out, decode_array(data, SIZE))
    wrong = np.zeros((SIZE, SIZE + 1, 3), dtype=np.uint8)  # not the decoded shape: its own array, buffer untouched
    assert decode_array(data, SIZE, out=wrong) is not wrong and not wrong.any()


def test_bad_images_fail_the_same_way_with_a_buffer(monkeypatch):
    cfg = ImageConfig(size=SIZE)
    cut = IMAGES["model size 4:2:0"][:200]
    for data in (cut, b"not an image at all"):
        with pytest.raises(BadSample) as plain:
            load_image(data, cfg, None, 10**8, "s.tar", "k", 1)
        with pytest.raises(BadSample) as buffered:
            load_image(data, cfg, None, 10**8, "s.tar", "k", 1, out=np.zeros((SIZE, SIZE, 3), np.uint8))
        assert (plain.value.reason, plain.value.detail) == (buffered.value.reason, buffered.value.detail)
        assert plain.value.reason == "bad_image"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE // 3)  # Pillow's bomb warning → image_too_large
    with pytest.raises(BadSample, match="image_too_large"):
        load_image(IMAGES["model size 4:2:0"], cfg, None, 10**8, "s.tar", "k", 0, out=np.zeros((SIZE, SIZE, 3), np.uint8))


def decoded(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def fill(buffer: np.ndarray | None, seed: int) -> np.ndarray:
    """What the loader does with a buffer: decode into it (or into its own array when none is left)."""
    if buffer is None:
        return decoded(seed)
    buffer[...] = decoded(seed)
    return buffer


def test_ring_positions_in_order_out_of_order_and_overflow():
    ring = PixelRing(workers=2, capacity=3, size=SIZE, depth=PREFETCH + 2)
    writer = RingWriter(ring, worker=1)
    a, b = fill(writer.buffer(), 1), fill(writer.buffer(), 2)
    ref = writer.ship([a, b])
    assert ref == (1, 0, 0, 2)  # decoded in place, in batch order: a count
    assert np.array_equal(ring.view(ref), np.stack([decoded(1), decoded(2)]))
    ring.check(ref)
    wasted = writer.buffer()  # a sample that failed after its buffer was handed out
    c, d, e = fill(writer.buffer(), 3), fill(writer.buffer(), 4), fill(writer.buffer(), 5)
    assert wasted is not None and e is not None and writer.buffer() is None  # capacity 3: the 4th has its own array
    e2 = fill(None, 6)
    ref = writer.ship([d, e2, c])
    assert ref == (1, 1, 1, (2, 0, 1))  # own array copied into the free position
    assert all(np.array_equal(x, y) for x, y in zip(ring.view(ref), [decoded(4), decoded(6), decoded(3)]))
    assert writer.ship([fill(None, s) for s in range(4)]) is None  # more than a slot holds: sent as a tensor


def test_waiting_images_move_to_the_next_slot_before_theirs_is_reused():
    ring = PixelRing(workers=1, capacity=3, size=SIZE, depth=2)
    writer = RingWriter(ring, worker=0)
    a, waits = fill(writer.buffer(), 1), [fill(writer.buffer(), 2)]
    ref0 = writer.ship([a], waiting=[waits])
    assert ref0 == (0, 0, 0, 1)
    assert np.array_equal(waits[0], decoded(2))
    # the carried image sits in batch 1's slot at its first position; later decodes come after it
    b = fill(writer.buffer(), 3)
    ref1 = writer.ship([b, waits[0]])
    assert ref1 == (0, 1, 1, (1, 0))
    assert all(np.array_equal(x, y) for x, y in zip(ring.view(ref1), [decoded(3), decoded(2)]))
    # batch 2 reuses slot 0 (depth 2): a reader still on batch 0 is told, not handed other pixels
    fill(writer.buffer(), 9)
    with pytest.raises(RuntimeError, match="overwritten"):
        ring.check(ref0)


def model_size_shards(root, sizes=(9, 8), text_only_every=4, images_each=None):
    """Shards whose images are exactly the model's size (the in-place path), with some off-size and text-only;
    1 or 2 images a sample, or `images_each`."""
    root.mkdir(parents=True)
    shards, n = [], 0
    for s, count in enumerate(sizes):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(count):
                images = 0 if text_only_every and n % text_only_every == 0 else images_each or 1 + n % 2
                conv = make_conversation(n, images, turns=1 + n % 3)
                sample = {"__key__": f"p{n}-catqa-0", "json": json.dumps({"conversation": conv}).encode()}
                for k in range(images):
                    sample[f"{k}.jpg"] = jpeg(SIZE + (5 if n % 7 == 3 else 0), SIZE, n * 3 + k, quality=90)
                sink.write(sample)
                n += 1
        shards.append({"name": name, "samples": count})
    manifest = {"format": "mmtrain-shards", "version": 1, "splits": {"train": {"samples": n, "shards": shards}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def loader_config(data, **kw):
    base = dict(data=str(data), num_image_slots=3, batch_size=3, max_length=512, num_workers=0,
                image=ImageConfig(size=SIZE), shuffle_buffer=5, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


@pytest.mark.parametrize("packed", [False, True])
def test_workers_decoding_into_the_ring_give_the_same_batches(tmp_path, packed):
    data = model_size_shards(tmp_path / "s")
    extra = dict(pack=True, max_length=400, batch_size=2) if packed else {}  # ~2 samples a row: some wait a step
    tok = tiny_tokenizer()
    plain = list(build_loader(loader_config(data, **extra), tok, rank=0, world_size=1))
    ringed = list(build_loader(loader_config(data, num_workers=1, **extra), tok, rank=0, world_size=1))
    assert len(plain) == len(ringed) > 3
    for x, y in zip(plain, ringed):
        assert x.keys() == y.keys() and x["keys"] == y["keys"]
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k


def test_worker_batches_travel_as_ring_positions(tmp_path, monkeypatch):
    """In a worker (faked in-process), a batch of model-size images is decoded in place: a count, no copy."""
    data = model_size_shards(tmp_path / "s", sizes=(12,), text_only_every=0)
    loader = build_loader(loader_config(data, num_workers=1, shuffle=False), tiny_tokenizer(), rank=0, world_size=1)
    loader.ring = PixelRing(1, loader._ring_capacity() * 2, SIZE, loader._ring_depth())
    monkeypatch.setattr(slot, "get_worker_info", lambda: types.SimpleNamespace(id=0))
    refs = [batch["pixel_ring"] for item in StreamDataset(loader, 0) for batch in item]
    assert len(refs) == 4 and all(isinstance(r[3], int) for r in refs)  # sample 3's off-size image: resized into it


def test_token_cache_gives_the_tokenizers_ids_and_stays_bounded():
    tok = tiny_tokenizer()
    encode = batch_encoder(tok)
    calls = []
    cache = TokenCache(lambda texts: calls.append(list(texts)) or encode(texts), fixed=["Human: ", "AI: "], size=8)
    texts = ["blue shirt", "Human: ", "blue shirt", "red ünïcode ☃ shoes #12", "", "AI: "]
    assert cache.ids(texts) == [tok.encode(t, add_special_tokens=False) if t else [] for t in texts]
    assert calls[-1] == ["blue shirt", "red ünïcode ☃ shoes #12"]  # the unseen, once each, in one call
    n = len(calls)
    assert cache.ids(["blue shirt"]) == [tok.encode("blue shirt", add_special_tokens=False)] and len(calls) == n
    for i in range(100):  # one-off texts pass through; a text in use and the template's strings stay
        cache.ids([f"answer {i}", "blue shirt"])
        assert len(cache) <= 8 + 3
    n = len(calls)
    assert cache.ids(["blue shirt", "Human: ", "AI: "]) and len(calls) == n
    assert cache.ids(["answer 0"]) == [tok.encode("answer 0", add_special_tokens=False)] and len(calls) == n + 1


def test_renderer_with_a_warm_or_tiny_cache_renders_the_same():
    tok = tiny_tokenizer()
    convs = [make_conversation(i % 5, i % 3, turns=1 + i % 2) for i in range(30)]
    cold = [Renderer(tok, "owl", 4).render(c) for c in convs]  # a fresh cache each time
    warm = Renderer(tok, "owl", 4)
    tiny = Renderer(tok, "alpaca", 4)
    tiny.tokens = TokenCache(batch_encoder(tok), size=2)
    for c, ref in zip(convs * 2, cold * 2):
        got = warm.render(c)
        assert (got.input_ids, got.labels, got.image_starts) == (ref.input_ids, ref.labels, ref.image_starts)
    for c in convs:
        a, b = tiny.render(c), Renderer(tok, "alpaca", 4).render(c)
        assert (a.input_ids, a.labels, a.image_starts) == (b.input_ids, b.labels, b.image_starts)


def test_batch_encoder_equals_the_tokenizer():
    tok = tiny_tokenizer()
    texts = ["Human: ", "\n", " two  spaces", "ünïcode ☃ #12 <image>", "What is the red shirt?\nAI: ", "x" * 300]
    assert batch_encoder(tok)(texts) == [tok.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("data", [b'{"a": [1, 2.5, "x"], "b": null}', b'{"conversation": "\xc3\xa9\xe2\x98\x83"}',
                                  b'\xef\xbb\xbf{"bom": 1}', '{"utf16": 1}'.encode("utf-16"), b'{"n": NaN}',
                                  b'{"conversation": "\xff\xfe"}', b'{"cut": ', b'[1, 2]', b' {"lead": 1} ', b'{',
                                  '{"le": 1}'.encode("utf-16-le"), b'{"surrogate": "\xed\xa0\x80"}'])
def test_json_shortcut_equals_json_loads(data):
    try:
        expected = json.loads(data)
    except Exception as exc:  # the same error, with the same message
        with pytest.raises(type(exc)) as got:
            tar_index.loads_json(data)
        assert str(got.value) == str(exc)
    else:
        result = tar_index.loads_json(data)
        assert json.dumps(result) == json.dumps(expected)


@pytest.mark.parametrize("chunk", [512, 700, 1536, 1 << 16])
def test_chunked_header_walk_equals_tarfile(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(tar_index, "CHUNK", chunk)
    path = tmp_path / "s.tar"  # written as the shard builder writes them (plain ustar: the direct walk)
    members = b"".join(tar_member(f"k{i}.{ext}", data) for i in range(6)
                       for ext, data in (("json", b"{}"), ("0.jpg", b"x" * (i * 300 + 1)), ("1.png", b"y" * 512)))
    path.write_bytes(members + end_of_archive(len(members)))
    with open(path, "rb") as f:
        assert tar_index._ustar_members(f) is not None
        f.seek(0)
        assert list(tar_index._ustar_members(f)) == list(tar_index._tarfile_members(str(path)))
    cut = tmp_path / "cut.tar"  # inside sample k1's second header: k0 whole, k1 with its json only
    cut.write_bytes(path.read_bytes()[:8 * 512 + 100])
    with open(cut, "rb") as f:
        assert tar_index._ustar_walk(f) == tar_index._tarfile_walk(str(cut))
    index = tar_index.ShardIndex(str(cut))
    assert index.cut and [(k, [e for e, _, _ in m]) for k, m in index.samples] == [("k0", ["json", "0.jpg", "1.png"]),
                                                                                     ("k1", ["json"])]


def test_whole_batch_normalize_equals_per_image_and_reference():
    cfg = ImageConfig(size=SIZE)
    images = [decoded(i) for i in range(5)]
    stacked = np.stack(images)
    reference = normalize_batch(torch.from_numpy(stacked).permute(0, 3, 1, 2), cfg)
    assert torch.equal(normalize_hwc_batch(stacked, cfg), reference)
    assert torch.equal(normalize_hwc_batch(images, cfg), reference)
    assert normalize_hwc_batch(stacked[:0], cfg).shape == (0, 3, SIZE, SIZE)


@pytest.mark.parametrize("name", ["k.json", "k.0.jpg", "a/b/k.0.JPG", "a.b/c.d", "dir/.hidden.json", ".x", "x.", "x",
                                  "a/b", "a/.b/c.d", "a\n.b", "a.b\n", "a/b\n/c.d", "a..b", "/abs/x.json", "x/", "",
                                  "../../escape.json", "a.b/.c", "ü/é.ß.jpg", "a\nb/c.d", ".", "/", "/.a", "a/b.c\n"])
def test_member_name_split_equals_webdatasets_rule(name):
    assert tar_index.split_name(name) == base_plus_ext(name)
