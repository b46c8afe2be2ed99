"""`mmtrain shards build` end to end on the real catalog: counts, splits, determinism, rejects, atomicity."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mmtrain.cli import main
from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.shards.product_tasks import TASKS
from mmtrain.data.shards.writer import BuildOptions, build_shards, read_manifest
from mmtrain.errors import UserError


def _build(spec: Path, catalog_dir: Path, out: Path, **kw) -> None:
    args = ["shards", "build", "--spec", str(spec), "--catalog", str(catalog_dir / "styles.csv"),
            "--out", str(out), "--no-progress", "--image-size", "128"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    assert main(args) == 0


@pytest.fixture(scope="module")
def full_build(tmp_path_factory, real_catalog: Path, fashion_spec: Path) -> Path:
    out = tmp_path_factory.mktemp("full") / "shards"
    _build(fashion_spec, real_catalog, out, workers=2, shard_size=2500)
    return out


def _catalog_ids(catalog_dir: Path) -> list[str]:
    with open(catalog_dir / "styles.csv", encoding="utf-8", newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def test_every_product_once_per_task_split_by_product(full_build: Path, real_catalog: Path) -> None:
    manifest = read_manifest(full_build)
    ids = _catalog_ids(real_catalog)
    seen: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    for split in ("train", "val"):
        urls = [str(full_build / s["name"]) for s in manifest["splits"][split]["shards"]]
        for raw in wds.WebDataset(urls, shardshuffle=False):
            record = json.loads(raw["json"])
            assert record["key"] == raw["__key__"]
            assert record["num_images"] == 1 and "0.jpg" in raw
            assert record["conversation"][0]["content"].count("<image>") == 1
            seen[split][(record["product_id"], record["task"])] += 1
    both = {p for p, _ in seen["train"]} & {p for p, _ in seen["val"]}
    assert not both, f"products on both sides of the split: {sorted(both)[:5]}"
    merged = seen["train"] + seen["val"]
    assert set(merged.values()) == {1}
    assert sorted(merged) == sorted((pid, task) for pid in ids for task in TASKS)
    val_products = manifest["splits"]["val"]["products"]
    assert manifest["splits"]["train"]["products"] + val_products == len(ids)
    assert 0.02 * len(ids) < val_products < 0.08 * len(ids)  # --val-fraction 0.05 by a hash of the id


def test_manifest_counts_equal_what_tar_and_webdataset_read(full_build: Path) -> None:
    manifest = read_manifest(full_build)
    for split, info in manifest["splits"].items():
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        assert info["samples"] == 5 * info["products"] and set(info["tasks"].values()) == {info["products"]}
        for shard in info["shards"]:
            members = subprocess.run(["tar", "-tf", str(full_build / shard["name"])], check=True,
                                     capture_output=True, text=True).stdout.split()
            assert sum(m.endswith(".json") for m in members) == shard["samples"]
            assert sum(m.endswith(".jpg") for m in members) == shard["images"]
            read = list(wds.WebDataset(str(full_build / shard["name"]), shardshuffle=False))
            assert len(read) == shard["samples"]
            assert sum(sum(k.endswith(".jpg") for k in r) for r in read) == shard["images"]


def test_images_are_rgb_jpeg_downscaled_never_upscaled(full_build: Path) -> None:
    manifest = read_manifest(full_build)
    shard = full_build / manifest["splits"]["val"]["shards"][0]["name"]
    sizes = set()
    for raw in wds.WebDataset(str(shard), shardshuffle=False):
        img = Image.open(io.BytesIO(raw["0.jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        sizes.add(max(img.size))
    assert sizes and max(sizes) == 128  # --image-size 128 on mostly 224 px photos
    small = Image.new("RGB", (40, 30), (200, 10, 10))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    from mmtrain.data.shards.image_encoding import reencode_image
    assert Image.open(io.BytesIO(reencode_image(buf.getvalue(), 128))).size == (40, 30)


def _subset(real_catalog: Path, dest: Path, n: int) -> Path:
    dest.mkdir(parents=True)
    (dest / "images").mkdir()
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[: n + 1]
    (dest / "styles.csv").write_bytes(b"".join(lines))
    for line in lines[1:]:
        pid = line.split(b",")[0].decode()
        shutil.copy(real_catalog / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    return dest


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_byte_identical_whatever_the_workers(tmp_path: Path, real_catalog: Path,
                                                       fashion_spec: Path) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 120)
    _build(fashion_spec, catalog, tmp_path / "a", workers=1, shard_size=100, per_task=2)
    _build(fashion_spec, catalog, tmp_path / "b", workers=2, shard_size=100, per_task=2)
    _build(fashion_spec, catalog, tmp_path / "c", workers=1, shard_size=100, per_task=2, seed=1)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert len(a) == 2 + len(list((tmp_path / "a").glob("*.tar")))
    assert a["train-000000.tar"] != c["train-000000.tar"]  # another seed draws other phrasings


def _plant_bad_rows(catalog: Path) -> dict[str, set[str]]:
    """Plant one or more of each kind of bad input; return the product ids expected per reject reason."""
    rows = (catalog / "styles.csv").read_bytes().splitlines(keepends=True)
    header, body = rows[0], rows[1:]
    ids = [r.split(b",")[0].decode() for r in body]
    for pid in ids[0:2]:
        (catalog / "images" / f"{pid}.jpg").unlink()                           # missing image ×2
    jpg = catalog / "images" / f"{ids[2]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])             # truncated JPEG
    (catalog / "images" / f"{ids[3]}.jpg").write_bytes(b"this is not an image")  # not an image
    Image.new("RGB", (400, 400), "white").save(catalog / "images" / f"{ids[4]}.jpg")  # over --max-image-pixels
    body[5] = body[5].rstrip(b"\n") + b",extra,fields\n"                       # wrong field count
    fields = body[6].split(b",")
    body[6] = b",".join(fields[:-1]) + b",\n"                                   # empty title
    body[7] = body[7].replace(b"Men", b"M\xe9n", 1) if b"Men" in body[7] else body[7][:-1] + b"\xff\n"  # not UTF-8
    body.append(body[8])                                                        # duplicate id (keeps the first)
    (catalog / "styles.csv").write_bytes(header + b"".join(body))
    return {"missing_image": set(ids[0:2]), "bad_image": {ids[2], ids[3]}, "image_too_large": {ids[4]},
            "malformed_row": {ids[5]}, "missing_field": {ids[6]}, "not_utf8": {ids[7]}, "duplicate_id": {ids[8]}}


def test_bad_inputs_are_rejected_exactly_and_good_rows_kept(tmp_path: Path, real_catalog: Path,
                                                            fashion_spec: Path) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 150)
    good_ids = _catalog_ids(catalog)
    expected = _plant_bad_rows(catalog)
    out = tmp_path / "out"
    argv = ["shards", "build", "--spec", str(fashion_spec), "--catalog", str(catalog / "styles.csv"),
            "--out", str(out), "--no-progress", "--max-image-pixels", "100000", "--workers", "2"]
    assert main(argv + ["--max-reject-fraction", "0.01"]) == 2  # 9 of 151 rows: the user must act …
    assert (out / "manifest.json").is_file()                      # … but the good rows are written all the same
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    got: dict[str, set[str]] = {}
    for r in rejects:
        got.setdefault(r["reason"], set()).add(r["product_id"])
        assert r["row"] is not None and r["file"].endswith("styles.csv") and r["detail"]
    assert got == expected
    assert len(rejects) == 9
    manifest = read_manifest(out)
    assert manifest["rows"] == 151 and sum(manifest["rejects"].values()) == 9
    bad = set().union(*(v for k, v in expected.items() if k != "duplicate_id"))
    kept = {json.loads(r["json"])["product_id"]
            for split in ("train", "val") for s in manifest["splits"][split]["shards"]
            for r in wds.WebDataset(str(out / s["name"]), shardshuffle=False)}
    assert kept == set(good_ids) - bad
    assert main(argv + ["--overwrite"]) == 2  # 6.0 % is over the default --max-reject-fraction 5 % too
    assert main(argv + ["--overwrite", "--max-reject-fraction", "0.1"]) == 0


def test_interrupted_build_leaves_previous_output_untouched(tmp_path: Path) -> None:
    from mmtrain.data.shards.records import Sample, WorkItem

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous build")

    def items():
        yield WorkItem("1", (), (Sample("k1", [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                             "content": "a"}], "t", "s", "1", 0),),
                       1, "f")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_shards(items(), BuildOptions(out=out, overwrite=True, progress=False), {})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "previous build"
    with pytest.raises(UserError, match="already exists"):
        build_shards(iter([]), BuildOptions(out=out, progress=False), {})


def test_text_only_variant_needs_no_images(tmp_path: Path, real_catalog: Path, fashion_spec: Path) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 40)
    shutil.rmtree(catalog / "images")
    summary = build_from_catalog(fashion_spec, catalog / "styles.csv", None,
                                 BuildOptions(out=tmp_path / "txt", progress=False), text_only=True)
    assert summary.rejects == Counter()
    splits = summary.manifest["splits"]
    assert splits["train"]["images"] == splits["val"]["images"] == 0
    assert splits["train"]["samples"] + splits["val"]["samples"] == 40 * 5
    raw = next(iter(wds.WebDataset(str(tmp_path / "txt" / splits["train"]["shards"][0]["name"]),
                                   shardshuffle=False)))
    assert "<image>" not in raw["json"].decode() and not any(k.endswith(".jpg") for k in raw)


def test_val_every_attribute_asks_every_attribute_in_val_and_leaves_train_byte_identical(
        tmp_path: Path, real_catalog: Path, fashion_spec: Path, capsys) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 40)
    _build(fashion_spec, catalog, tmp_path / "drawn", val_fraction=0.3, tasks="attribute_qa")
    assert "every attribute" not in capsys.readouterr().out
    _build(fashion_spec, catalog, tmp_path / "every", val_fraction=0.3, tasks="attribute_qa", val_every_attribute=True)
    assert "val asks every attribute" in capsys.readouterr().out  # the build's table says how it was drawn
    drawn, every = read_manifest(tmp_path / "drawn"), read_manifest(tmp_path / "every")
    assert every["source"]["val_every_attribute"] is True and drawn["source"]["val_every_attribute"] is False
    assert drawn["splits"]["train"] == every["splits"]["train"]
    for shard in drawn["splits"]["train"]["shards"]:
        assert (tmp_path / "drawn" / shard["name"]).read_bytes() == (tmp_path / "every" / shard["name"]).read_bytes()
    val = every["splits"]["val"]
    asked: Counter = Counter()
    for shard in val["shards"]:
        for raw in wds.WebDataset(str(tmp_path / "every" / shard["name"]), shardshuffle=False):
            record = json.loads(raw["json"])
            asked[record["product_id"]] += 1
    assert len(asked) == val["products"] == drawn["splits"]["val"]["products"] > 0
    assert set(asked.values()) == {5}  # gender, colour, season, year, usage: every product of this catalog has all five
    assert val["samples"] == 5 * val["products"] == 5 * drawn["splits"]["val"]["samples"]
    capsys.readouterr()
    assert main(["shards", "build", "--format", "llava", "--input", str(tmp_path / "x.json"), "--out",
                 str(tmp_path / "x"), "--val-every-attribute"]) != 0
    assert "--val-every-attribute and --attribute-weight are for catalogs" in capsys.readouterr().err


def test_attribute_weights_skew_attribute_qa_are_recorded_and_bad_ones_stop_before_writing(
        tmp_path: Path, real_catalog: Path, fashion_spec: Path, capsys) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 40)
    _build(fashion_spec, catalog, tmp_path / "w", val_fraction=0.0, tasks="attribute_qa", per_task=5,
           attribute_weight="colour=12")
    manifest = read_manifest(tmp_path / "w")
    assert manifest["source"]["attribute_weights"] == {"colour": 12.0}
    assert "attribute QA weights: colour 12 (others 1)" in capsys.readouterr().out  # the build's table says so
    asked: Counter = Counter()
    for shard in manifest["splits"]["train"]["shards"]:
        for raw in wds.WebDataset(str(tmp_path / "w" / shard["name"]), shardshuffle=False):
            asked[raw["__key__"].split("_attribute_qa_")[1].split("_", 1)[1].split("-")[0]] += 1
    assert sum(asked.values()) == 200
    assert abs(asked["colour"] / 200 - 0.75) < 0.1  # 12 / (12 + 4): 0.75 ± 3.3 standard errors
    _build(fashion_spec, catalog, tmp_path / "plain", val_fraction=0.0, tasks="attribute_qa")
    assert read_manifest(tmp_path / "plain")["source"]["attribute_weights"] == {}

    base = ["shards", "build", "--spec", str(fashion_spec), "--catalog", str(catalog / "styles.csv"),
            "--no-progress", "--out"]
    for weight, message in (("color=4", "has no such attribute (its attributes: gender, colour, season, year, usage)"),
                            ("colour=0", "must be a number > 0"), ("colour=nan", "must be a number > 0"),
                            ("colour", "expected NAME=WEIGHT")):
        capsys.readouterr()
        out = tmp_path / f"bad-{weight}"
        assert main(base + [str(out), "--attribute-weight", weight]) != 0
        assert message in capsys.readouterr().err and not out.exists()
    assert main(base + [str(tmp_path / "twice"), "--attribute-weight", "colour=2", "--attribute-weight",
                        "colour=3"]) != 0
    assert "'colour' given twice" in capsys.readouterr().err


def _products_by_split(folder: Path) -> dict[str, Counter]:
    manifest = read_manifest(folder)
    out: dict[str, Counter] = {}
    for split, info in manifest["splits"].items():
        out[split] = Counter()
        for shard in info["shards"]:
            for raw in wds.WebDataset(str(folder / shard["name"]), shardshuffle=False):
                out[split][json.loads(raw["json"])["product_id"]] += 1
    return out


def test_test_split_is_carved_from_train_and_leaves_val_as_it_was(
        tmp_path: Path, real_catalog: Path, fashion_spec: Path) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 60)
    _build(fashion_spec, catalog, tmp_path / "two", val_fraction=0.25, tasks="attribute_qa")
    _build(fashion_spec, catalog, tmp_path / "three", val_fraction=0.25, test_fraction=0.25, tasks="attribute_qa",
           val_every_attribute=True)
    two, three = _products_by_split(tmp_path / "two"), _products_by_split(tmp_path / "three")
    assert set(two) == {"train", "val"} and set(three) == {"train", "val", "test"}
    assert "test_fraction" not in read_manifest(tmp_path / "two")
    assert read_manifest(tmp_path / "three")["test_fraction"] == 0.25
    assert set(three["val"]) == set(two["val"])  # the products knobs were chosen on stay the val split
    assert set(three["test"]) | set(three["train"]) == set(two["train"])
    assert not set(three["test"]) & set(three["train"]) and 5 <= len(three["test"]) <= 25
    assert set(three["test"].values()) == set(three["val"].values()) == {5}  # held-out products ask every attribute
    assert set(three["train"].values()) == {1}
    with pytest.raises(UserError, match="--test-fraction"):
        BuildOptions(out=tmp_path / "x", val_fraction=0.5, test_fraction=0.5)
