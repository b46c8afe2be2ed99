"""Bad samples planted into shards built from the real catalog, trained on 2 gloo ranks: the run completes, the skip
counts per reason are exact (metrics.jsonl and run-report.json), both ranks take every step, and a resume from
mid-run gives the same losses and counts as the uninterrupted run."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
from shard_surgery import png_header, read_samples, white_jpeg, with_conv, write_samples

from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.shard_plan import load_shards
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.shards.tar_members import tar_member
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.data.shards.writer import BuildOptions
from mmtrain.launching import run_ranks

from train_helpers import REPO, metrics, stage, write_recipe

# (shard, position) → (reason, new members from old ones)
PLANTS = {
    (0, 2): ("bad_json", lambda m: {**m, "json": b"{not json"}),
    (0, 5): ("missing_fields", lambda m: {**m, "json": b'{"key": "x"}'}),
    (1, 1): ("bad_image", lambda m: {"0.jpg": m["0.jpg"][:len(m["0.jpg"]) // 2], "json": m["json"]}),
    (1, 4): ("image_too_large", lambda m: {"0.png": png_header(20000, 20000), "json": m["json"]}),
    (1, 7): ("image_too_large", lambda m: {"0.jpg": white_jpeg(300), "json": m["json"]}),  # > max_image_pixels
    (2, 3): ("image_count_mismatch", lambda m: {"0.jpg": m["0.jpg"], "1.jpg": m["0.jpg"], "json": m["json"]}),
    (2, 6): ("no_label_after_truncation", lambda m: {**m, "json": with_conv(m, [
        {"role": "user", "content": "<image>\n" + "What is this shirt made of? " * 150},
        {"role": "assistant", "content": "Cotton."}])}),
}
CUT_SHARD, CUT_AT = 3, 20  # shard 3 ends inside sample 20's json: samples 20.. are lost


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, real_catalog: Path, tiny_data) -> dict:
    root = tmp_path_factory.mktemp("bad-train")
    (root / "styles.csv").write_bytes(b"".join((real_catalog / "styles.csv").read_bytes()
                                               .splitlines(keepends=True)[:25]))
    out = root / "mm"
    build_from_catalog(REPO / "shards" / "catalogs" / "fashion-products.yaml", root / "styles.csv", real_catalog,
                       BuildOptions(out=out, image_size=48, shard_size=30, val_fraction=0.0, progress=False))
    shards = [Path(s.path) for s in load_shards(out)]
    expected: dict[str, int] = {}
    for (index, position), (reason, plant) in PLANTS.items():
        samples = read_samples(shards[index])
        samples[position] = (samples[position][0], plant(samples[position][1]))
        write_samples(shards[index], samples)
        expected[reason] = expected.get(reason, 0) + 1
    samples = read_samples(shards[CUT_SHARD])
    head = sum(len(tar_member(f"{k}.{e}", d)) for k, m in samples[:CUT_AT] for e, d in m.items())
    head += sum(len(tar_member(f"{samples[CUT_AT][0]}.{e}", d)) for e, d in samples[CUT_AT][1].items() if e != "json")
    write_samples(shards[CUT_SHARD], samples, cut=head + 512 + 7)
    expected["truncated_shard"] = len(samples) - CUT_AT
    total = sum(s.samples for s in load_shards(out))
    return {"mm": out, "text": tiny_data["text"], "tokenizer": tiny_data["tokenizer"], "expected": expected,
            "total": total}


def _one_epoch_in_process(data: dict) -> tuple[int, dict[str, int]]:
    """Steps of one exact epoch, and the skip counts the loader's plan gives for it on 2 ranks, replayed here
    with the trainer's loader settings. A slot fills each skipped sample with the next one of its run, wrapping to
    the run's start, so a bad sample there is read (and counted) again: the counts are at least the planted ones."""
    cfg = LoaderConfig(data=[{"shards": str(data["mm"]), "weight": 1.0}], num_image_slots=9, batch_size=4,
                       max_length=512, num_workers=0, mode="exact", on_bad_sample="skip", max_image_pixels=200 * 200,
                       image=ImageConfig(size=32))
    counts: Counter = Counter()
    steps = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rank in (0, 1):
            loader = build_loader(cfg, load_tokenizer(data["tokenizer"]), rank, 2)
            steps.add(sum(1 for _ in loader))
            counts.update(loader.sample_counts()["skipped"])
    assert len(steps) == 1
    return steps.pop(), dict(counts)


def _recipe(tmp: Path, data: dict, steps: int, **faults) -> Path:
    return write_recipe(tmp / "recipe.yaml", data, [
        stage("pretrain", data, train={"vision": True, "connector": True, "llm": "full"}, steps=steps,
              max_length=512, save_every=steps // 2, loader={"num_workers": 0, "mode": "exact"})],
        faults={"max_image_pixels": 200 * 200, "max_skip_fraction": 0.05, **faults})


def test_bad_samples_are_skipped_counted_exactly_and_resume_is_exact(bad_shards, tmp_path: Path) -> None:
    steps, expected = _one_epoch_in_process(bad_shards)
    assert all(expected[reason] >= n for reason, n in bad_shards["expected"].items()) and expected.keys() == \
        bad_shards["expected"].keys()
    recipe = _recipe(tmp_path, bad_shards, steps)
    whole = tmp_path / "whole"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(whole)], log=tmp_path / "whole.log", timeout=600)
    log = (tmp_path / "whole.log").read_text()
    assert result.returncode == 0, log[-3000:]
    records = metrics(whole)
    assert [m["step"] for m in records] == list(range(1, steps + 1))
    assert records[-1]["skipped"] == expected
    assert records[-1]["samples_read"] == steps * 4 * 2 + sum(expected.values())  # delivered + skipped
    report = json.loads((whole / "run-report.json").read_text())["stages"][0]
    assert report["skipped"] == expected
    for rank in (0, 1):  # both ranks took every step
        beat = json.loads((whole / "heartbeat" / f"rank-{rank}.json").read_text())
        assert (beat["step"], beat["phase"]) == (steps, "done")
    assert "skipping bad sample" in log and "bad_json" in log and "truncated_shard" in log

    half = tmp_path / "half"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(half), "--stop-after-steps", str(steps // 2)],
                       log=tmp_path / "half.log", timeout=600)
    assert result.returncode == 0, (tmp_path / "half.log").read_text()[-3000:]
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(half), "--resume"], log=tmp_path / "resume.log",
                       timeout=600)
    assert result.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    resumed = metrics(half)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in records]
    assert [m["skipped"] for m in resumed] == [m["skipped"] for m in records]


def test_too_many_bad_samples_stop_the_run_naming_the_counts(bad_shards, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, bad_shards, 6, max_skip_fraction=0.001)
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(tmp_path / "run")], log=tmp_path / "run.log",
                       timeout=600)
    log = (tmp_path / "run.log").read_text()
    assert result.returncode != 0
    assert "samples unreadable" in log and "faults.max_skip_fraction 0.001" in log, log[-3000:]
