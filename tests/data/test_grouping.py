"""`group_by: modality_length` on real shards, a real DataLoader (2 workers) and 2 simulated ranks: batches hold one
modality of similar length, each epoch delivers exactly the samples of the ungrouped loader, resume is exact."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from loader_fixtures import break_json, tiny_tokenizer, write_shard_set
from test_stream import all_keys, assert_same_batches, config, take_then_resume

from mmtrain.data.loader.collate import Example, padding_waste
from mmtrain.data.loader.grouping import WINDOW, group_window
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.bad_samples import SkippedSampleWarning
from mmtrain.data.loader.stream import build_loader
from mmtrain.errors import UserError

B, W = 4, 3
"""120 samples over 2 ranks × 2 workers: 30 per slot = batches of 4 × 7 + 2, in windows of 3, 3 and 2 batches."""
SIZES = [4] * 7 + [2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("group") / "s", [40, 33, 47])  # 120 samples, a third text-only


def grouped(data, **kw):
    return config(data, **{"batch_size": B, "group_by": "modality_length", "group_window": W, **kw})


def epochs(cfg, n: int = 2, world: int = 2) -> tuple[dict, dict]:
    """{rank: [epoch's batches, ...]} and {rank: sample_counts() after the last epoch}."""
    out, counts = {}, {}
    for rank in range(world):
        loader = build_loader(cfg, tiny_tokenizer(), rank=rank, world_size=world)
        out[rank] = [list(loader) for _ in range(n)]
        counts[rank] = loader.sample_counts()
        loader.close()
    return out, counts


def windows(batches: list[dict], workers: int = 2, window: int = W) -> dict[tuple[int, int], list[dict]]:
    """A rank's epoch by (worker slot, window): batch b comes from slot b % workers (worker_handoff.py's round-robin)."""
    out: dict[tuple[int, int], list[dict]] = {}
    for b, batch in enumerate(batches):
        out.setdefault((b % workers, b // workers // window), []).append(batch)
    return out


def image_rows(batch: dict) -> list[bool]:
    """Per sample: whether it carries an image (the rows that `image_slots` names)."""
    rows = set(batch["image_slots"][:, 0].tolist())
    return [r in rows for r in range(len(batch["keys"]))]


def kind(batch: dict) -> str:
    rows = image_rows(batch)
    return "image" if all(rows) else "text" if not any(rows) else "mixed"


def fake(key: str, length: int, image: bool) -> Example:
    pixels = [np.zeros((2, 2, 3), np.uint8)] if image else None
    return Example([1] * length, [1] * length, [0] if image else [], pixels, key)


def test_group_window_sorts_each_modality_and_cuts_one_mixed_batch():
    """Images ascending, text descending, cut in order, shuffled by key: exactly one batch straddles the two."""
    examples = [fake("i10", 10, True), fake("i30", 30, True), fake("t15", 15, False), fake("i20", 20, True),
                fake("i50", 50, True), fake("t5", 5, False), fake("i40", 40, True), fake("t25", 25, False)]
    batches = group_window(examples, [2, 2, 2, 2], "group:0:0:0:0")
    keys = [[ex.key for ex in b] for b in batches]
    assert sorted(keys) == sorted([["i10", "i20"], ["i30", "i40"], ["i50", "t25"], ["t15", "t5"]])
    assert keys == [[ex.key for ex in b] for b in group_window(examples, [2, 2, 2, 2], "group:0:0:0:0")]
    assert sum(len({k[0] for k in b}) == 2 for b in keys) == 1
    orders = {tuple(tuple(ex.key for ex in b) for b in group_window(examples, [2] * 4, f"k{i}")) for i in range(20)}
    assert len(orders) > 1  # the key seeds the batch order
    with pytest.raises(ValueError, match="window of 8 samples"):
        group_window(examples, [4, 3], "k")


def test_config_refuses_bad_values_and_packing():
    with pytest.raises(UserError, match="group_by must be one of none, modality_length, got 'modality'"):
        config("x", group_by="modality")
    with pytest.raises(UserError, match="group_window .* must be >= 1, got 0"):
        config("x", group_by="modality_length", group_window=0)
    with pytest.raises(UserError, match="group_by: modality_length cannot be combined with pack: true"):
        config("x", group_by="modality_length", pack=True)
    assert config("x").group_by == "none" and config("x").group_window == WINDOW == 16


def flagged(batches: list[dict]) -> list[tuple[str, bool]]:
    """The batches' samples as sorted (key, filler) pairs."""
    return sorted((k, f) for b in batches for k, f in zip(b["keys"], b["filler"].tolist()))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("group_uneven") / "s", [7, 5, 9])  # 21 samples: 3 fillers


@pytest.mark.parametrize("case", ["even", "uneven"])
def test_exact_epochs_deliver_the_ungrouped_samples_window_by_window(shards, uneven, case):
    """2 ranks × 2 workers, 2 epochs: the same batch count on every rank, every sample once per epoch, and each
    (slot, window) holds exactly the samples the ungrouped loader puts in those batches (fillers included).
    even: 120 samples, 30 per slot in batches of 4 (windows of 3, 3, 2 batches); uneven: 21 samples, 6 per slot
    (3 fillers) in batches of 2 (windows of 2, 1 batches)."""
    data, batch, window, steps, fillers = {"even": (shards, B, W, 16, 0), "uneven": (uneven, 2, 2, 6, 3)}[case]
    got, got_counts = epochs(grouped(str(data), batch_size=batch, group_window=window))
    plain, plain_counts = epochs(config(str(data), batch_size=batch))
    for rank in range(2):
        assert [len(e) for e in got[rank]] == [len(e) for e in plain[rank]] == [steps, steps]
        for epoch in range(2):
            mine, theirs = windows(got[rank][epoch], window=window), windows(plain[rank][epoch], window=window)
            assert mine.keys() == theirs.keys() and len(mine) == 2 * -(-steps // 2 // window)
            for where, batches in mine.items():
                assert flagged(batches) == flagged(theirs[where]), (rank, epoch, where)
                assert sorted(len(b["keys"]) for b in batches) == sorted(len(b["keys"]) for b in theirs[where])
    for epoch in range(2):
        real = Counter(k for rank in range(2) for b in got[rank][epoch]
                       for k, f in zip(b["keys"], b["filler"].tolist()) if not f)
        assert sorted(real) == sorted(all_keys(data)) and set(real.values()) == {1}
        assert sum(int(b["filler"].sum()) for rank in range(2) for b in got[rank][epoch]) == fillers
    assert got_counts == plain_counts
    assert sum(c["read"] for c in got_counts.values()) == 2 * (len(all_keys(data)) + fillers)


def test_batches_hold_one_modality_and_pad_less(shards):
    """Per (slot, window) at most one mixed batch, and exactly one when the window's image samples do not fill whole
    batches; a window's one-modality batches cover disjoint length ranges; padding drops against group_by: none."""
    got, _ = epochs(grouped(str(shards)), n=1)
    plain, _ = epochs(config(str(shards), batch_size=B), n=1)
    kinds = Counter()
    for rank in range(2):
        for (slot, window), batches in windows(got[rank][0]).items():
            rows = [image_rows(b) for b in batches]
            mixed = sum(any(r) and not all(r) for r in rows)
            images = sum(map(sum, rows))
            sizes = SIZES[window * W:(window + 1) * W]
            assert sorted(map(len, rows)) == sorted(sizes)
            if set(sizes) == {B}:
                assert mixed == int(images % B != 0), (rank, slot, window)
            assert mixed <= 1
            for modality in (True, False):  # length-sorted: same-kind batches of a window cover disjoint length ranges
                spans = sorted((min(n), max(n)) for b, r in zip(batches, rows) if set(r) == {modality}
                               for n in [b["attention_mask"].sum(1).tolist()])
                assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans
            kinds.update(kind(b) for b in batches)
    plain_kinds = Counter(kind(b) for rank in range(2) for b in plain[rank][0])
    assert kinds == {"image": 19, "text": 11, "mixed": 2} and plain_kinds == {"mixed": 32}, (kinds, plain_kinds)
    text_batch = next(b for rank in range(2) for b in got[rank][0] if not any(image_rows(b)))
    assert text_batch["pixel_values"].shape == (0, 3, 8, 8) and text_batch["image_slots"].shape == (0, 2)

    def waste(runs: dict) -> float:
        pad, total = map(sum, zip(*(padding_waste(b) for rank in runs.values() for b in rank[0])))
        return pad / total
    assert waste(got) < 0.75 * waste(plain), (waste(got), waste(plain))


def test_ranks_take_the_same_modality_at_the_same_step(shards):
    """The batch order of a window is shared by the slots that feed the same steps on every rank, so the steps at
    which a rank holds image samples are nested with the other rank's (likewise text): ranks disagree only where one
    window has more batches of a kind."""
    got, _ = epochs(grouped(str(shards)), n=1)
    per_rank = [windows(got[r][0]) for r in range(2)]
    disagree = 0
    for where in per_rank[0]:
        kinds = [[kind(b) for b in per_rank[r][where]] for r in range(2)]
        for other in ("text", "image"):
            held = [{p for p, k in enumerate(ks) if k != other} for ks in kinds]
            assert held[0] <= held[1] or held[1] <= held[0], (where, kinds)
        disagree += sum(a != b for a, b in zip(*kinds))
    assert disagree == 2 and sum(map(len, per_rank[0].values())) == 16


def test_text_only_and_image_only_batches_train_the_same_graph(shards):
    """A grouped text-only batch and an image-only batch each give a finite loss and gradients on the same vision
    weights (the model's dummy image: the same graph on every rank); the text-only batch's are exactly 0."""
    from mmtrain.data.loader.image_token import image_token_id
    from mmtrain.model import VisionLanguageModel, num_image_slots, tiny_config
    from mmtrain.train.runtime import model_inputs

    tok = tiny_tokenizer()
    model_cfg = tiny_config("mlp", vocab_size=len(tok), image_token_id=image_token_id(tok), layers=1)
    cfg = grouped(str(shards), num_image_slots=num_image_slots(model_cfg), num_workers=0, image=ImageConfig(size=32))
    batches = list(build_loader(cfg, tok, rank=0, world_size=2))
    text = next(b for b in batches if not any(image_rows(b)))
    image = next(b for b in batches if all(image_rows(b)) and len(b["keys"]) == B)
    assert text["pixel_values"].shape[0] == 0 and image["pixel_values"].shape[0] >= B
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(model_cfg)
    graphs = []
    for batch, zero in ((text, True), (image, False)):
        model.zero_grad(set_to_none=True)
        loss = model(**model_inputs(batch, torch.device("cpu"), torch.float32)).loss
        loss.backward()
        assert torch.isfinite(loss)
        grads = {n: p.grad for n, p in model.vision.named_parameters() if p.grad is not None}
        assert len(grads) > 10 and all(bool(g.eq(0).all()) for g in grads.values()) == zero
        graphs.append(sorted(grads))
    assert graphs[0] == graphs[1]


@pytest.mark.parametrize("take", [1, 6, 7, 13, 16])
def test_resume_inside_and_between_windows_is_exact(shards, take):
    """Cursors taken inside a window (1, 7, 13), on window boundaries (6) and at the epoch's end (16), 2 epochs."""
    take_then_resume(grouped(str(shards)), take)


def test_resume_without_workers_mixture_and_resampled(tmp_path, shards):
    take_then_resume(grouped(str(shards), num_workers=0, uneven="trim", batch_size=3, group_window=4), 5)
    text = write_shard_set(tmp_path / "text", [6, 5], text_only_every=1, key_prefix="t")
    mix = grouped([{"shards": str(shards), "weight": 0.7}, {"shards": str(text), "weight": 0.3}],
                  samples_per_epoch=40)
    take_then_resume(mix, 3, epochs=3)
    take_then_resume(grouped(str(shards), mode="resampled", samples_per_epoch=40), 2)


def test_workers_give_the_in_process_batches_pixel_for_pixel(shards):
    """One worker (images decoded into their own arrays, copied into the ring slot of their batch) against no
    worker: token for token, pixel for pixel."""
    tok = tiny_tokenizer()
    plain = list(build_loader(grouped(str(shards), num_workers=0), tok, rank=0, world_size=1))
    ringed = list(build_loader(grouped(str(shards), num_workers=1), tok, rank=0, world_size=1))
    assert len(plain) == 30 and sum(b["pixel_values"].shape[0] for b in plain) > 100
    assert_same_batches(ringed, plain)


def test_cursor_refuses_another_grouping(shards):
    tok = tiny_tokenizer()
    state = build_loader(config(str(shards), batch_size=B), tok, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="grouping none, this run has modality_length/3"):
        build_loader(grouped(str(shards)), tok, rank=0, world_size=2).load_state_dict(state)
    state = build_loader(grouped(str(shards)), tok, rank=0, world_size=2).state_dict()
    with pytest.raises(UserError, match="group_by and group_window"):
        build_loader(grouped(str(shards), group_window=4), tok, rank=0, world_size=2).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "group"}
    build_loader(config(str(shards), batch_size=B), tok, rank=0, world_size=2).load_state_dict(legacy)


def test_bad_sample_is_skipped_and_replaced_inside_a_window(tmp_path):
    """on_bad_sample=skip: the broken sample is skipped and counted, the next one read fills its place in the window;
    every good sample is delivered once, ranks stay in step, resume is exact."""
    root = write_shard_set(tmp_path / "bad", [30, 30])
    break_json(root / "train-000001.tar", "p35-catqa-0")
    cfg = grouped(str(root), on_bad_sample="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        got, counts = epochs(cfg, n=1)
        assert [len(got[r][0]) for r in range(2)] == [8, 8]  # 15 per slot: batches 4, 4, 4, 3
        real = Counter(k for r in range(2) for b in got[r][0] for k, f in zip(b["keys"], b["filler"].tolist())
                       if not f)
        assert sorted(real) == sorted(k for k in all_keys(root) if k != "p35-catqa-0") and set(real.values()) == {1}
        assert sum(c["skipped"].get("bad_json", 0) for c in counts.values()) == 1
        take_then_resume(cfg, 1)
