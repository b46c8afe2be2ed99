"""`mmtrain shards merge`: parts built from disjoint rows of one catalog merge into the shard set one build writes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from mmtrain.cli import main
from mmtrain.data.shards.merge import merge_shard_sets, shard_keys
from mmtrain.data.loader.shard_plan import load_shards
from mmtrain.data.shards.writer import read_manifest
from mmtrain.errors import UserError

ROWS = 60
PARTS = 3


def _write_rows(src: Path, dst: Path, keep) -> Path:
    """Header + the data rows (0-based) for which keep(i) holds, CSV-quoted as read."""
    with open(src, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    with open(dst, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(rows[0])
        writer.writerows(r for i, r in enumerate(rows[1:ROWS + 1]) if keep(i))
    return dst


def _build(spec: Path, catalog: Path, images: Path, out: Path, *extra: str) -> Path:
    assert main(["shards", "build", "--spec", str(spec), "--catalog", str(catalog), "--images", str(images),
                 "--out", str(out), "--no-progress", "--image-size", "32", "--shard-size", "40",
                 "--val-fraction", "0.2", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, real_catalog: Path, fashion_spec: Path) -> dict[str, object]:
    root = tmp_path_factory.mktemp("merge")
    whole = _build(fashion_spec, _write_rows(real_catalog / "styles.csv", root / "all.csv", lambda i: True),
                   real_catalog, root / "whole")
    parts = []
    for p in range(PARTS):  # every PARTS-th row, as launch/slurm/shards.sbatch cuts the catalog
        csv_path = _write_rows(real_catalog / "styles.csv", root / f"part-{p}.csv", lambda i, p=p: i % PARTS == p)
        parts.append(_build(fashion_spec, csv_path, real_catalog, root / f"part-{p}"))
    return {"root": root, "whole": whole, "parts": parts, "spec": fashion_spec, "images": real_catalog}


def _samples(folder: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key → {member suffix: bytes} for every sample of a split."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(folder)["splits"][split]["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for member in tar:
                key, suffix = member.name.split(".", 1)
                out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def test_merged_parts_equal_one_build(built, tmp_path: Path) -> None:
    whole, parts = built["whole"], built["parts"]
    out = tmp_path / "merged"
    assert main(["shards", "merge", "--out", str(out), *map(str, parts)]) == 0
    merged, reference = read_manifest(out), read_manifest(whole)
    assert merged["rows"] == reference["rows"] == ROWS
    for split in ("train", "val"):
        m, r = merged["splits"][split], reference["splits"][split]
        for field in ("samples", "images", "products", "tasks"):
            assert m[field] == r[field], (split, field)
        names = [s["name"] for s in m["shards"]]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]  # unique, numbered across parts
        assert sum(len(read_manifest(p)["splits"][split]["shards"]) for p in parts) == len(names)
        for shard in m["shards"]:
            assert len(shard_keys(out / shard["name"])) == shard["samples"]
        # The same samples, byte for byte (per-product RNG: a part draws what the whole build draws).
        assert _samples(out, split) == _samples(whole, split)
    assert r["samples"] > 0 and merged["splits"]["val"]["samples"] > 0
    # Hard links by default: no copy of the data.
    first = read_manifest(parts[0])["splits"]["train"]["shards"][0]["name"]
    assert os.path.samefile(out / "train-000000.tar", parts[0] / first)
    assert [Path(p["part"]).name for p in merged["source"]["merged_from"]] == [p.name for p in parts]
    # The loader reads it as any shard set.
    assert sum(s.samples for s in load_shards(out)) == reference["splits"]["train"]["samples"]


def test_copy_mode_and_rejects_are_concatenated(built, tmp_path: Path) -> None:
    parts = built["parts"]
    (parts[1] / "rejects.jsonl").write_text(json.dumps({"row": 3, "reason": "missing_image"}) + "\n")
    try:
        manifest = merge_shard_sets(parts, tmp_path / "copy", mode="copy")
    finally:
        (parts[1] / "rejects.jsonl").write_text("")
    assert not os.path.samefile(tmp_path / "copy" / "train-000000.tar",
                                parts[0] / read_manifest(parts[0])["splits"]["train"]["shards"][0]["name"])
    lines = [json.loads(x) for x in (tmp_path / "copy" / "rejects.jsonl").read_text().splitlines()]
    assert lines == [{"row": 3, "reason": "missing_image", "part": parts[1].name}]
    assert manifest["splits"]["train"]["samples"] == read_manifest(built["whole"])["splits"]["train"]["samples"]


def test_duplicate_keys_across_parts_fail_clearly(built, tmp_path: Path) -> None:
    parts = built["parts"]
    twice = tmp_path / "part-0-again"
    shutil.copytree(parts[0], twice)
    with pytest.raises(UserError, match=r"duplicate key .* in part-0/.* and in part-0-again/"):
        merge_shard_sets([parts[0], parts[1], twice], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    # Overlapping row ranges (not disjoint product sets): the same products' keys come twice.
    overlap = _build(built["spec"], _write_rows(built["images"] / "styles.csv", tmp_path / "overlap.csv",
                                                lambda i: i < 10), built["images"], tmp_path / "overlap")
    assert main(["shards", "merge", "--out", str(tmp_path / "out"), str(parts[0]), str(overlap)]) == 2


def test_incompatible_parts_and_existing_out_are_refused(built, tmp_path: Path) -> None:
    parts = built["parts"]
    other_seed = _build(built["spec"], _write_rows(built["images"] / "styles.csv", tmp_path / "tail.csv",
                                                   lambda i: i >= ROWS - 3), built["images"], tmp_path / "seed1",
                        "--seed", "1")
    with pytest.raises(UserError, match="seed"):
        merge_shard_sets([parts[0], other_seed], tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        merge_shard_sets(parts, tmp_path / "exists")
    merge_shard_sets(parts, tmp_path / "exists", overwrite=True)
    assert read_manifest(tmp_path / "exists")["rows"] == ROWS
    broken = tmp_path / "broken"
    shutil.copytree(parts[1], broken)
    name = read_manifest(broken)["splits"]["train"]["shards"][0]["name"]
    (broken / name).unlink()
    with pytest.raises(UserError, match=f"names {name}, which is not there"):
        merge_shard_sets([parts[0], broken], tmp_path / "out2")


@pytest.mark.parametrize("field, default, other", [("val_every_attribute", False, True),
                                                   ("attribute_weights", {}, {"colour": 4.0})])
def test_newer_source_options_must_agree_and_read_as_their_default_when_absent(built, tmp_path: Path, field: str,
                                                                             default, other) -> None:
    parts = built["parts"]
    older, differing = tmp_path / "older", tmp_path / "other"
    for copy, edit in ((older, lambda src: src.pop(field)), (differing, lambda src: src.update({field: other}))):
        shutil.copytree(parts[1], copy)
        manifest = read_manifest(copy)
        assert manifest["source"][field] == default
        edit(manifest["source"])
        (copy / "manifest.json").write_text(json.dumps(manifest))
    merge_shard_sets([parts[0], older, parts[2]], tmp_path / "merged")  # a manifest from before the option
    assert read_manifest(tmp_path / "merged")["rows"] == ROWS
    with pytest.raises(UserError, match=f"{field} differs"):
        merge_shard_sets([parts[0], differing, parts[2]], tmp_path / "refused")
