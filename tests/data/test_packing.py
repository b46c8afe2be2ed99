"""Token-budget packing on real shards, a real DataLoader (2 workers) and 2 simulated ranks: each step is
`batch_size` rows of `max_length` tokens, every sample once per exact epoch, equal step counts, exact resume."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from loader_fixtures import break_json, tiny_tokenizer, write_shard_set
from test_stream import all_keys, config, run_ranks, take_then_resume

from mmtrain.data.loader import packing
from mmtrain.data.loader.collate import padding_waste
from mmtrain.data.loader.bad_samples import SkippedSampleWarning
from mmtrain.data.loader.stream import build_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("pack") / "s", [40, 33, 47])  # 120 samples, 3 shards


def packed(data, **kw):
    return config(data, **{"pack": True, "batch_size": 2, "max_length": 512, **kw})


def check_epoch(shards, batches: dict, rows: int, max_length: int, extra_rows_ok: bool = False) -> list[dict]:
    counts = {r: len(b) for r, b in batches.items()}
    assert len(set(counts.values())) == 1, counts  # every rank takes the same number of steps
    real = Counter()
    flat = [b for rank in batches.values() for b in rank]
    for b in flat:
        assert b["attention_mask"].sum(1).max().item() <= max_length
        assert b["input_ids"].shape[0] >= rows
        assert len(b["keys"]) == len(b["filler"]) == int(b["cu_seqlens"].numel()) - 1
        real.update(k for k, f in zip(b["keys"], b["filler"].tolist()) if not f)
    assert sorted(real) == sorted(all_keys(shards)) and set(real.values()) == {1}  # each sample exactly once
    return flat


def test_budget_steps_cover_the_epoch_once_with_little_padding(shards):
    """Samples of 145-197 tokens: rows of 1024 hold ~6; padding 8 of them to the longest wastes ~9 %."""
    cfg = packed(str(shards), max_length=1024)
    loader = build_loader(cfg, tiny_tokenizer(), rank=0, world_size=2)
    batches = run_ranks(cfg)
    assert {len(b) for b in batches.values()} == {len(loader)}
    flat = check_epoch(shards, batches, rows=2, max_length=1024)
    assert all(b["input_ids"].shape[0] == 2 for b in flat)  # the estimate held: no step added rows
    pad, total = map(sum, zip(*(padding_waste(b) for b in flat)))
    padded = [padding_waste(b) for rank in run_ranks(config(str(shards), batch_size=8, max_length=1024)).values()
              for b in rank]
    pad_p, total_p = map(sum, zip(*padded))
    assert pad / total < 0.04 and pad / total < 0.5 * pad_p / total_p, (pad / total, pad_p / total_p)
    assert sum(len(b["keys"]) for b in flat) / len(flat) > 8  # a token budget, not batch_size samples


@pytest.mark.parametrize("margin", [0.4, 3.0], ids=["too-many-steps", "too-few-steps"])
def test_a_wrong_estimate_costs_fillers_or_rows_never_samples(shards, monkeypatch, margin):
    """Too many steps: the last ones are filled with fillers. Too few: steps add rows to finish on time."""
    monkeypatch.setattr(packing, "MARGIN", margin)
    batches = run_ranks(packed(str(shards)))
    flat = check_epoch(shards, batches, rows=2, max_length=512, extra_rows_ok=margin > 1)
    grown = [b for b in flat if b["input_ids"].shape[0] > 2]
    assert bool(grown) == (margin > 1)
    if margin < 1:
        assert sum(b["filler"].all().item() for b in flat) > 0  # whole steps of fillers at the end


@pytest.mark.parametrize("take", [1, 4, 7])
def test_packed_resume_is_exact(shards, take):
    take_then_resume(packed(str(shards), shuffle_buffer=5), take)


def test_packed_resume_with_waiting_samples_and_trim(shards):
    """Rows of 300 tokens hold one or two samples of 145-197: samples often wait for the next step, so cursors
    carry waiting samples (replayed on resume). Single worker, trim."""
    cfg = packed(str(shards), uneven="trim", num_workers=0, max_length=300, batch_size=3)
    loader = build_loader(cfg, tiny_tokenizer(), rank=0, world_size=2)
    waiting = []
    for step, _ in enumerate(loader, 1):
        if loader.state_dict()["slots"]["0"]["pack"]["pending"]:
            waiting.append(step)
    assert len(waiting) >= 2, waiting
    for take in waiting[:2]:
        take_then_resume(cfg, take)


def test_packed_mixture_and_resampled(tmp_path, shards):
    text = write_shard_set(tmp_path / "text", [6, 5], text_only_every=1, key_prefix="t")
    mix = packed([{"shards": str(shards), "weight": 0.7}, {"shards": str(text), "weight": 0.3}],
                 samples_per_epoch=60)
    batches = run_ranks(mix)
    assert len({len(b) for b in batches.values()}) == 1
    assert sum(len(b["keys"]) for rank in batches.values() for b in rank) >= 60
    take_then_resume(mix, 3, epochs=3)
    take_then_resume(packed(str(shards), mode="resampled", samples_per_epoch=50), 2)


def test_packed_bad_sample_is_skipped_counted_and_resumed(tmp_path):
    """on_bad_sample=skip with packing: the broken sample is skipped and counted (in its worker, with the usual warning);
    every good sample is delivered once, ranks stay in step, resume is exact."""
    root = write_shard_set(tmp_path / "bad", [30, 30])
    break_json(root / "train-000001.tar", "p35-catqa-0")
    cfg = packed(str(root), on_bad_sample="skip", max_length=1024)
    loaders = [build_loader(cfg, tiny_tokenizer(), rank=r, world_size=2) for r in range(2)]
    batches = {r: list(loader) for r, loader in enumerate(loaders)}
    assert len({len(b) for b in batches.values()}) == 1
    real = Counter(k for rank in batches.values() for b in rank for k, f in zip(b["keys"], b["filler"].tolist())
                   if not f)
    assert sorted(real) == sorted(k for k in all_keys(root) if k != "p35-catqa-0") and set(real.values()) == {1}
    assert sum(loader.dropped().get("bad_json", 0) for loader in loaders) >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        take_then_resume(cfg, 1)


def test_cursor_refuses_a_different_epoch_length(shards):
    from mmtrain.errors import UserError

    tok = tiny_tokenizer()
    state = build_loader(packed(str(shards)), tok, rank=0, world_size=2).state_dict()
    for other in (packed(str(shards), max_length=1024), config(str(shards), batch_size=2)):
        with pytest.raises(UserError, match="pack|steps_per_epoch"):
            build_loader(other, tok, rank=0, world_size=2).load_state_dict(state)
