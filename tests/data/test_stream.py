"""Streaming loader on real webdataset shards with a real DataLoader (2 workers) and 2 simulated ranks."""

import json
from collections import Counter

import pytest
import torch
from loader_fixtures import tiny_tokenizer, write_shard_set

from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.stream import build_loader
from mmtrain.errors import UserError


def config(data, **kw):
    base = dict(data=data, num_image_slots=3, batch_size=2, max_length=512, num_workers=2,
                image=ImageConfig(size=8), shuffle_buffer=4, seed=7)
    base.update(kw)
    return LoaderConfig(**base)


def run_ranks(cfg, world=2):
    """One epoch on each simulated rank: {rank: [batch, ...]}."""
    return {r: list(build_loader(cfg, tiny_tokenizer(), rank=r, world_size=world)) for r in range(world)}


def all_keys(shards_dir):
    out = []
    for s in json.loads((shards_dir / "manifest.json").read_text())["splits"]["train"]["shards"]:
        out += [f"p{n}-catqa-{n % 5}" for n in range(len(out), len(out) + s["samples"])]
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["keys"] == y["keys"]
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k  # token for token, pixel for pixel


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("uneven") / "s", [7, 5, 9])  # 21 samples, 3 shards


def test_exact_epoch_every_sample_once_and_equal_steps(shards):
    """3 shards over 2 ranks × 2 workers: 21 samples → 4 slots × 6 (3 fillers), 3 batches per worker."""
    loader = build_loader(config(str(shards)), tiny_tokenizer(), rank=0, world_size=2)
    assert len(loader) == 6
    for epoch in range(2):
        batches = run_ranks(config(str(shards), seed=7 + epoch))
        assert [len(b) for b in batches.values()] == [6, 6]
        real, fillers = Counter(), 0
        for rank_batches in batches.values():
            for b in rank_batches:
                assert b["input_ids"].shape[0] == 2 and b["input_ids"].shape[1] % 8 == 0
                real.update(k for k, f in zip(b["keys"], b["filler"].tolist()) if not f)
                fillers += int(b["filler"].sum())
                assert b["pixel_values"].shape == (len(b["image_slots"]), 3, 8, 8)
        assert sorted(real) == sorted(all_keys(shards)) and set(real.values()) == {1}
        assert fillers == 4 * 6 - 21


def test_trim_and_single_worker_layouts(shards):
    batches = run_ranks(config(str(shards), uneven="trim", num_workers=0, batch_size=4))
    assert [len(b) for b in batches.values()] == [3, 3]  # 21 // 2 = 10 per rank → batches of 4, 4, 2
    keys = [k for bs in batches.values() for b in bs for k in b["keys"]]
    assert len(keys) == 20 and len(set(keys)) == 20 and not any(b["filler"].any() for bs in batches.values() for b in bs)


def test_equal_steps_when_samples_are_dropped(shards):
    """A max_length that truncates every 2-image sample to nothing learned (a third of them): drops are counted,
    fillers keep every rank at the same step count."""
    tok = tiny_tokenizer()
    cfg = config(str(shards), max_length=99)  # 2-image samples learn from position 99 on, the others by 98
    loaders = [build_loader(cfg, tok, rank=r, world_size=2) for r in range(2)]
    counts = [len(list(loader)) for loader in loaders]
    assert counts == [6, 6]
    dropped = Counter()
    for loader in loaders:
        dropped.update(loader.dropped())
    assert set(dropped) == {"no_label_after_truncation"} and dropped["no_label_after_truncation"] >= 7


def test_mixture_weights_within_tolerance(tmp_path):
    """0.7 / 0.3 over 2,000 draws: binomial sd = sqrt(2000·0.21) ≈ 20.5 samples; tolerance 3 sd = ±0.031."""
    mm = write_shard_set(tmp_path / "mm", [30, 30], source="multimodal")
    text = write_shard_set(tmp_path / "text", [25], text_only_every=1, source="text", key_prefix="t")
    cfg = config([{"shards": str(mm), "weight": 0.7}, {"shards": str(text), "weight": 0.3}], mode="resampled",
                 samples_per_epoch=2000, batch_size=50, num_workers=2)
    loader = build_loader(cfg, tiny_tokenizer(), rank=0, world_size=1)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 2000
    frac = sum(k.startswith("p") for k in keys) / 2000
    assert abs(frac - 0.7) < 0.031, frac


def take_then_resume(cfg, take, world=2, epochs=2):
    tok = tiny_tokenizer()
    for rank in range(world):
        full = []
        straight = build_loader(cfg, tok, rank=rank, world_size=world)
        for _ in range(epochs):
            full += list(straight)
        first = build_loader(cfg, tok, rank=rank, world_size=world)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == take:
                break
        state = json.loads(json.dumps(first.state_dict()))  # the cursor survives JSON
        resumed = build_loader(cfg, tok, rank=rank, world_size=world)
        resumed.load_state_dict(state)
        tail = []
        for _ in range(epochs):
            tail += list(resumed)
        assert_same_batches(head + tail, full)


@pytest.mark.parametrize("take", [1, 3, 4])
def test_resume_mid_epoch_is_exact(shards, take):
    take_then_resume(config(str(shards), shuffle_buffer=3), take)


def test_resume_mixture_and_packing(tmp_path, shards):
    text = write_shard_set(tmp_path / "text", [6, 5], text_only_every=1, key_prefix="t")
    cfg = config([{"shards": str(shards), "weight": 0.7}, {"shards": str(text), "weight": 0.3}],
                 samples_per_epoch=30, pack=True, batch_size=3, max_length=256)
    take_then_resume(cfg, 3)  # mid-epoch: the packed epoch is 4 steps on each rank
    resampled = config(str(shards), mode="resampled", samples_per_epoch=24, shuffle_buffer=2)
    take_then_resume(resampled, 3)


def test_cursor_checks_layout(shards):
    tok = tiny_tokenizer()
    state = build_loader(config(str(shards)), tok, rank=0, world_size=2).state_dict()
    other = build_loader(config(str(shards), num_workers=1), tok, rank=0, world_size=2)
    with pytest.raises(UserError, match="num_workers=2"):
        other.load_state_dict(state)


def test_bad_sample_names_shard_and_key(tmp_path):
    import webdataset as wds

    root = write_shard_set(tmp_path / "bad", [4])
    with wds.TarWriter(str(root / "train-000000.tar")) as sink:  # overwrite with one broken json
        sink.write({"__key__": "p0-catqa-0", "json": b"{not json"})
        for n in range(1, 4):
            sink.write({"__key__": f"p{n}", "json": json.dumps({"conversation": [], "num_images": 0}).encode()})
    with pytest.raises(ValueError, match=r"train-000000.tar: sample p0-catqa-0"):
        list(build_loader(config(str(root), num_workers=0, batch_size=1, on_bad_sample="raise"), tiny_tokenizer(),
                          rank=0, world_size=1))
    with wds.TarWriter(str(root / "train-000000.tar")) as sink:  # fewer samples than the manifest says
        sink.write({"__key__": "p0-catqa-0", "json": b"{}"})
    with pytest.raises(ValueError, match="train-000000.tar: sample p0-catqa-0: no json member with a conv"):
        list(build_loader(config(str(root), num_workers=0, batch_size=1, shuffle=False, on_bad_sample="raise"),
                          tiny_tokenizer(), rank=0, world_size=1))
    with pytest.warns(UserWarning, match="skipping bad sample"), \
            pytest.raises(ValueError, match="train-000000.tar: has 1 samples, fewer than its manifest entry"):
        list(build_loader(config(str(root), num_workers=0, batch_size=1, shuffle=False, on_bad_sample="skip"),
                          tiny_tokenizer(), rank=0, world_size=1))
    with pytest.raises(UserError, match="no manifest.json"):
        build_loader(config(str(tmp_path)), tiny_tokenizer(), rank=0, world_size=1)
