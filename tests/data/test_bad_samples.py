"""Bad samples in shards built from the real catalog: each kind is skipped with one warning naming shard, key and
reason, counted exactly under its reason, replaced so every rank stays in step, and resumed exactly.

The shard set is built once from the first 40 products of the catalog (5 shards × 40 samples, one image each), then
corrupted in place as if it went bad after the build (manifest left as it was).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from loader_fixtures import tiny_tokenizer
from shard_surgery import conv, png_header, read_samples, white_jpeg, with_conv, write_samples

from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.loader.cursor import SourceCursor
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.shard_plan import make_sources
from mmtrain.data.loader.tar_index import ShardReader
from mmtrain.data.loader.bad_samples import DATA_REASONS, BadSample, SkippedSampleWarning
from mmtrain.data.loader.slot import SlotStream
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.epoch import Plan
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.shards.tar_members import tar_member
from mmtrain.data.shards.writer import BuildOptions

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "shards" / "catalogs" / "fashion-products.yaml"
SHARDS, PER_SHARD = 5, 40
CUT_AT = 35  # shard 4 is cut inside sample 35's last member: samples 35..39 are lost


# (shard, position) → reason, and how to plant it (members of the sample → new members)
PLANTS = {
    (0, 3): ("bad_json", lambda m: {**m, "json": b"{not json"}),
    (0, 6): ("bad_json", lambda m: {**m, "json": b'{"conversation": "\xff\xfe"}'}),  # not UTF-8
    (0, 9): ("missing_fields", lambda m: {**m, "json": json.dumps({"key": "x", "turns": []}).encode()}),
    (1, 2): ("missing_fields", lambda m: {**m, "json": b"[1, 2]"}),
    (1, 5): ("missing_fields", lambda m: {"0.jpg": m["0.jpg"]}),  # no json member at all
    (1, 8): ("bad_image", lambda m: {"0.jpg": m["0.jpg"][:len(m["0.jpg"]) // 2], "json": m["json"]}),
    (1, 11): ("bad_image", lambda m: {"0.jpg": b"this is not an image", "json": m["json"]}),
    (2, 1): ("image_too_large", lambda m: {"0.png": png_header(20000, 20000), "json": m["json"]}),  # Pillow's error
    (2, 4): ("image_too_large", lambda m: {"0.png": png_header(10000, 10000), "json": m["json"]}),  # its warning
    (2, 7): ("image_too_large", lambda m: {"0.jpg": white_jpeg(200), "json": m["json"]}),  # > max_image_pixels
    (3, 0): ("image_count_mismatch", lambda m: {"0.jpg": m["0.jpg"], "1.jpg": m["0.jpg"], "json": m["json"]}),
    (3, 3): ("image_count_mismatch", lambda m: {"json": m["json"]}),
    (3, 6): ("no_label", lambda m: {**m, "json": with_conv(m, conv(m)["conversation"][:1])}),
    (3, 9): ("no_label_after_truncation", lambda m: {**m, "json": with_conv(m, [
        {"role": "user", "content": "<image>\n" + "What is this shirt made of? " * 60},
        {"role": "assistant", "content": "Cotton."}])}),
}


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory, real_catalog: Path) -> dict:
    """The clean set, the corrupted copy, and what was planted where."""
    root = tmp_path_factory.mktemp("bad-samples")
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[:SHARDS * PER_SHARD // 5 + 1]
    (root / "styles.csv").write_bytes(b"".join(lines))
    clean = root / "clean"
    build_from_catalog(SPEC, root / "styles.csv", real_catalog,
                       BuildOptions(out=clean, image_size=48, shard_size=PER_SHARD, val_fraction=0.0, progress=False))
    manifest = json.loads((clean / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [PER_SHARD] * SHARDS
    bad = root / "bad"
    shutil.copytree(clean, bad)
    keys, planted = [], {}
    for s in range(SHARDS):
        path = bad / f"train-{s:06d}.tar"
        samples = read_samples(path)
        keys += [k for k, _ in samples]
        for (shard, pos), (reason, plant) in PLANTS.items():
            if shard == s:
                samples[pos] = (samples[pos][0], plant(samples[pos][1]))
                planted[(path.name, pos)] = (samples[pos][0], reason)
        if s == SHARDS - 1:  # cut mid-member: the middle of sample CUT_AT's json, its last member
            before = b"".join(tar_member(f"{k}.{e}", d) for k, m in samples[:CUT_AT] for e, d in m.items())
            image = tar_member(f"{samples[CUT_AT][0]}.0.jpg", samples[CUT_AT][1]["0.jpg"])
            cut = len(before) + len(image) + 512 + len(samples[CUT_AT][1]["json"]) // 2
            write_samples(path, samples, cut=cut)
            for pos in range(CUT_AT, PER_SHARD):
                planted[(path.name, pos)] = (samples[pos][0], "truncated_shard")
        else:
            write_samples(path, samples)
    return {"clean": clean, "bad": bad, "keys": keys, "planted": planted}


def config(data, **kw) -> LoaderConfig:
    base = dict(data=str(data), num_image_slots=4, batch_size=4, max_length=320, num_workers=2, seed=3,
                shuffle_buffer=8, on_bad_sample="skip", max_image_pixels=10_000, image=ImageConfig(size=16))
    base.update(kw)
    return LoaderConfig(**base)


def planned_counts(cfg: LoaderConfig, planted: dict, world: int) -> tuple[Counter, int]:
    """What the loader must count, from the plan alone: replay every slot's reading order (no bytes read), skip
    each planted position it meets, until the slot has its samples. Filler re-reads of a bad sample count again."""
    class Where:
        def read(self, path: str, pos: int) -> tuple[str, int]:
            return Path(path).name, pos

    sources = make_sources(cfg.data, cfg.split)
    plan = Plan(cfg, sources, world)
    skipped, read = Counter(), 0
    for slot in range(plan.num_slots):
        cursor = SourceCursor(sources[0], 0, slot, plan.num_slots, cfg.seed, cfg.mode, plan.loop, cfg.shuffle,
                              cfg.shuffle_buffer, Where())  # type: ignore[arg-type]
        delivered = 0
        while delivered < plan.samples_per_slot:
            where, _ = cursor.next()
            read += 1
            if where in planted:
                skipped[planted[where][1]] += 1
            else:
                delivered += 1
    return skipped, read


@pytest.fixture(scope="module")
def epoch(shard_sets) -> dict:
    """One uninterrupted epoch on 2 simulated ranks × 2 workers: batches and counts per rank."""
    cfg = config(shard_sets["bad"])
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)  # workers print theirs; counted below
        for rank in range(2):
            loader = build_loader(cfg, tiny_tokenizer(), rank=rank, world_size=2)
            out[rank] = {"batches": list(loader), "counts": loader.sample_counts(), "steps": len(loader)}
    return out


def test_every_good_sample_once_and_exact_counts(shard_sets, epoch):
    planted = shard_sets["planted"]
    bad_keys = {key for key, _ in planted.values()}
    good = [k for k in shard_sets["keys"] if k not in bad_keys]
    assert len(good) == SHARDS * PER_SHARD - len(PLANTS) - (PER_SHARD - CUT_AT)
    assert [len(r["batches"]) for r in epoch.values()] == [r["steps"] for r in epoch.values()] == [26, 26]
    real, delivered = Counter(), 0
    for r in epoch.values():
        for b in r["batches"]:
            real.update(k for k, f in zip(b["keys"], b["filler"].tolist()) if not f)
            delivered += len(b["keys"])
            assert b["pixel_values"].shape == (len(b["image_slots"]), 3, 16, 16)
    assert sorted(real) == sorted(good) and set(real.values()) == {1}  # nothing good lost, nothing bad delivered

    skipped = sum((Counter(r["counts"]["skipped"]) for r in epoch.values()), Counter())
    read = sum(r["counts"]["read"] for r in epoch.values())
    expected, expected_read = planned_counts(config(shard_sets["bad"]), planted, world=2)
    assert skipped == expected and read == expected_read == delivered + sum(skipped.values())
    once = Counter(reason for _, reason in planted.values())
    assert skipped == once  # in this layout no filler re-reads a bad sample (the replay above would count it)
    assert once == {"bad_json": 2, "missing_fields": 3, "bad_image": 2, "image_too_large": 3,
                    "image_count_mismatch": 2, "no_label": 1, "no_label_after_truncation": 1, "truncated_shard": 5}
    assert set(once) - {"no_label", "no_label_after_truncation"} < set(DATA_REASONS)


@pytest.mark.parametrize("rank,take", [(0, 5), (1, 19)])
def test_resume_mid_epoch_is_exact(shard_sets, epoch, rank, take):
    cfg = config(shard_sets["bad"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        first = build_loader(cfg, tiny_tokenizer(), rank=rank, world_size=2)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == take:
                break
        state = json.loads(json.dumps(first.state_dict()))
        mid = first.sample_counts()
        resumed = build_loader(cfg, tiny_tokenizer(), rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert resumed.sample_counts() == mid and 0 < mid["read"] < epoch[rank]["counts"]["read"]
        tail = list(resumed)
    full = epoch[rank]["batches"]
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        assert got["keys"] == want["keys"]
        for name in ("input_ids", "labels", "pixel_values", "image_slots", "filler"):
            assert torch.equal(got[name], want[name]), name  # token for token, pixel for pixel
    assert resumed.sample_counts() == epoch[rank]["counts"]


def test_one_warning_per_skip_names_shard_key_reason(shard_sets):
    """In-process (num_workers=0) so the warnings can be caught: one per skipped sample, the same counts."""
    cfg = config(shard_sets["bad"], num_workers=0)
    loader = build_loader(cfg, tiny_tokenizer(), rank=0, world_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(loader)
    skips = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert not [w for w in caught if not issubclass(w.category, SkippedSampleWarning)]  # no stray Pillow warnings
    planted = shard_sets["planted"]
    seen = Counter()
    for (shard, pos), (key, reason) in planted.items():
        if reason in DATA_REASONS:
            key = f"#{pos}" if reason == "truncated_shard" and pos > CUT_AT else key
            start = f"skipping bad sample {key} in {shard_sets['bad'] / shard}: {reason} ("
            hits = [s for s in skips if s.startswith(start)]
            assert hits, start
            seen[reason] += len(hits)
    assert len(skips) == sum(seen.values())
    detail = {reason_at: next(s for s in skips if f" {planted[reason_at][0]} in " in s) for reason_at in planted
              if planted[reason_at][1] in ("bad_image", "image_too_large")}
    assert "decompression bomb" in detail[("train-000002.tar", 1)]  # Pillow's DecompressionBombError
    assert "decompression bomb" in detail[("train-000002.tar", 4)]  # Pillow's DecompressionBombWarning
    assert "200x200 = 40000 pixels > max_image_pixels 10000" in detail[("train-000002.tar", 7)]  # header, no decode
    assert "truncated" in detail[("train-000001.tar", 8)]  # the lazy decode was forced inside the check
    assert "not an image" in detail[("train-000001.tar", 11)]
    counts = loader.sample_counts()["skipped"]
    assert {r: n for r, n in counts.items() if r in DATA_REASONS} == dict(seen)
    assert planned_counts(cfg, planted, world=1)[0] == Counter(counts)


@pytest.mark.parametrize("reason", sorted({r for r, _ in PLANTS.values()} - {"no_label", "no_label_after_truncation"})
                         + ["truncated_shard"])
def test_raise_names_shard_key_and_reason(shard_sets, tmp_path, reason):
    """on_bad_sample=raise: the first bad sample stops the loader with a ValueError naming shard, key and reason."""
    root = tmp_path / "one"
    shutil.copytree(shard_sets["bad"], root)
    (shard, pos), (key, _) = next(((w, p) for w, p in shard_sets["planted"].items() if p[1] == reason))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = [s for s in manifest["splits"]["train"]["shards"] if s["name"] == shard]
    if reason != "truncated_shard":  # a shard of just this sample (the cut shard stays whole: the cut is the fault)
        write_samples(root / shard, read_samples(root / shard)[pos:pos + 1])
        manifest["splits"]["train"]["shards"][0]["samples"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    cfg = config(root, num_workers=0, shuffle=False, on_bad_sample="raise", batch_size=1)
    with pytest.raises(BadSample) as info:
        list(build_loader(cfg, tiny_tokenizer(), rank=0, world_size=1))
    err = info.value
    assert isinstance(err, ValueError) and (err.shard, err.key, err.reason) == (str(root / shard), key, reason)
    assert str(err).startswith(f"{root / shard}: sample {key}: ") and str(err).endswith(f"({reason})")


def cut_points(path: Path) -> list[int]:
    """Offsets that cut a shard in a header, at a member boundary, and inside member data."""
    with tarfile.open(path) as tf:
        members = [m for m in tf]
    m = members[5]
    return [m.offset + 100, m.offset, m.offset_data + m.size // 2, m.offset_data + 1]


@pytest.mark.parametrize("long_names", [False, True])
def test_cut_shard_index_never_returns_short_bytes(shard_sets, tmp_path, long_names):
    """Whatever the cut, samples before it read whole and every later position is `truncated_shard`; with long
    member names the `tarfile` fallback walks the headers, and it must not crash on a cut either."""
    samples = read_samples(shard_sets["clean"] / "train-000000.tar")[:8]
    if long_names:
        samples = [("x" * 110 + key, members) for key, members in samples]
    whole = tmp_path / "whole.tar"
    write_samples(whole, samples)
    for cut in cut_points(whole):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(whole.read_bytes()[:cut])
        reader = ShardReader()
        index = reader.index(str(path))
        assert index.cut
        for pos in range(len(samples)):
            try:
                got = reader.read(str(path), pos)
            except BadSample as exc:
                assert exc.reason == "truncated_shard" and pos >= len(index) - 1
                continue
            assert pos < len(index) - 1 and got["0.jpg"] == samples[pos][1]["0.jpg"]
            assert got["json"] == json.loads(samples[pos][1]["json"])
        reader.close()
    assert not ShardReader().index(str(whole)).cut


def test_member_names_are_data_not_paths(shard_sets, tmp_path, monkeypatch):
    """Members named `../../escape.json`, `/abs/x.json` (and a long one through the tarfile fallback) are read as
    keys; neither the loader nor `shards inspect` / `shards merge` writes a file named after a member."""
    from mmtrain.data.loader.split_records import iter_shard_samples
    from mmtrain.data.shards.merge import merge_shard_sets

    root = tmp_path / "esc"
    shutil.copytree(shard_sets["clean"], root)
    shard = root / "train-000000.tar"
    samples = read_samples(shard)
    image, record = samples[0][1]["0.jpg"], conv(samples[0][1])
    odd = {"../../escape": 1, "/abs/x": 0, "../../" + "y" * 120: 0}
    for key, n in odd.items():
        text = [{"role": "user", "content": "<image>\nWhat is it?" if n else "What is it?"},
                {"role": "assistant", "content": "A shirt."}]
        members = {"0.jpg": image} if n else {}
        samples.append((key, {**members, "json": json.dumps({**record, "key": key, "conversation": text,
                                                              "num_images": n}).encode()}))
    write_samples(shard, samples)
    manifest = json.loads((root / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    split["shards"][0]["samples"] += len(odd)
    split["samples"] += len(odd)
    (root / "manifest.json").write_text(json.dumps(manifest))

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a member written as a path would land in tmp_path
    before = sorted(p for p in tmp_path.rglob("*"))
    assert not os.path.exists("/abs")
    loader = build_loader(config(root, num_workers=0, shuffle=False), tiny_tokenizer(),
                          rank=0, world_size=1)
    keys = [k for b in loader for k in b["keys"]]
    assert set(odd) <= set(keys)
    assert {r["key"] for r in iter_shard_samples(root, "train")} >= set(odd)
    merged = tmp_path / "merged"
    merge_shard_sets([root], merged, mode="copy")
    after = sorted(p for p in tmp_path.rglob("*") if merged not in p.parents and p != merged)
    assert after == before and not os.path.exists("/abs")
    assert sorted(p.name for p in merged.iterdir()) == sorted(["manifest.json", "rejects.jsonl"] + [
        f"train-{s:06d}.tar" for s in range(SHARDS)])


def test_inspect_and_eval_reader_skip_bad_samples_with_the_loaders_warning(shard_sets):
    """`mmtrain shards inspect` / eval read records through the same checks: a warning per bad sample, no traceback."""
    from mmtrain.data.loader.split_records import iter_shard_samples

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedSampleWarning)
        records = list(iter_shard_samples(shard_sets["bad"], "train"))
    reasons = Counter(str(w.message).split(": ")[1].split(" ")[0] for w in caught
                      if issubclass(w.category, SkippedSampleWarning))
    # images are not decoded here, so bad_image / image_too_large samples are listed (their bytes shown as they are)
    assert {r: reasons[r] for r in ("bad_json", "missing_fields", "image_count_mismatch")} == {
        "bad_json": 2, "missing_fields": 3, "image_count_mismatch": 2}
    assert set(reasons) <= {"bad_json", "missing_fields", "image_count_mismatch", "truncated_shard"}
    assert all(isinstance(r["conversation"], list) for r in records)
    assert len(records) + sum(reasons.values()) <= SHARDS * PER_SHARD


def test_stage_by_stage_batches_equal_sample_by_sample(shard_sets, epoch, monkeypatch):
    """A batch's samples are read, then checked and rendered, then decoded, stage by stage. With skips at every
    stage (read: bad json, the cut shard; check and render: missing fields, no label; decode: bad and too large
    images) the replacements keep read order, so the batches and counts are exactly those of taking the samples
    one by one through every stage."""
    staged = SlotStream._examples
    monkeypatch.setattr(SlotStream, "_examples", lambda self, size: [ex for _ in range(size) for ex in staged(self, 1)])
    for rank in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedSampleWarning)
            loader = build_loader(config(shard_sets["bad"]), tiny_tokenizer(), rank=rank, world_size=2)
            one_by_one = list(loader)
        assert loader.sample_counts() == epoch[rank]["counts"]
        assert len(one_by_one) == len(epoch[rank]["batches"])
        for got, want in zip(one_by_one, epoch[rank]["batches"]):
            assert got["keys"] == want["keys"]
            for name in ("input_ids", "labels", "pixel_values", "image_slots", "filler"):
                assert torch.equal(got[name], want[name]), name
