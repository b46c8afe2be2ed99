"""How the builder moves bytes: workers write segments, the parent places them; output independent of the worker count."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from mmtrain.data.shards import writer
from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.shards.records import Sample, WorkItem
from mmtrain.data.shards.writer import BuildOptions, build_shards, read_manifest


@pytest.fixture()
def catalog(tmp_path: Path, real_catalog: Path) -> Path:
    """60 real products, three of them with a broken image (rejected in a worker, mid-chunk)."""
    dest = tmp_path / "cat"
    (dest / "images").mkdir(parents=True)
    lines = (real_catalog / "styles.csv").read_bytes().splitlines(keepends=True)[:61]
    (dest / "styles.csv").write_bytes(b"".join(lines))
    ids = [line.split(b",")[0].decode() for line in lines[1:]]
    for pid in ids:
        shutil.copy(real_catalog / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    for pid in ids[7], ids[8], ids[31]:
        path = dest / "images" / f"{pid}.jpg"
        path.write_bytes(path.read_bytes()[:300])
    Image.new("L", (300, 200), 90).save(dest / "images" / f"{ids[12]}.jpg")  # grey and too big: re-encoded
    return dest


def _build(spec: Path, catalog: Path, out: Path, workers: int) -> dict[str, str]:
    build_from_catalog(spec, catalog / "styles.csv", None,
                       BuildOptions(out=out, workers=workers, shard_size=7, val_fraction=0.3, image_size=128,
                                    progress=False, max_reject_fraction=1.0), per_task=2)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def test_byte_identical_for_any_worker_count_across_chunks_and_shards(tmp_path: Path, catalog: Path,
                                                                     fashion_spec: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer, "CHUNK_ITEMS", 5)  # many chunks, each straddling shard boundaries
    one = _build(fashion_spec, catalog, tmp_path / "w1", 1)
    assert _build(fashion_spec, catalog, tmp_path / "w2", 2) == one
    assert _build(fashion_spec, catalog, tmp_path / "w3", 3) == one
    for out in ("w1", "w2", "w3"):
        assert not [p for p in (tmp_path / out).iterdir() if p.name.startswith(".")], "segments left behind"
    manifest = read_manifest(tmp_path / "w2")
    assert manifest["rejects"] == {"bad_image": 3}
    for split, info in manifest["splits"].items():
        assert len(info["shards"]) > 2 and info["products"] > 0
        for shard in info["shards"]:
            members = subprocess.run(["tar", "-tf", str(tmp_path / "w2" / shard["name"])], check=True,
                                     capture_output=True, text=True).stdout.split()
            assert sum(m.endswith(".json") for m in members) == shard["samples"] <= 7
            assert sum(m.endswith(".jpg") for m in members) == shard["images"]
    rejects = [json.loads(line) for line in (tmp_path / "w2" / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [8, 9, 32]


def test_fallbacks_for_copy_file_range_and_short_writes(tmp_path: Path, catalog: Path, fashion_spec: Path,
                                                        monkeypatch) -> None:
    reference = _build(fashion_spec, catalog, tmp_path / "ref", 2)

    def no_copy(*args, **kw):
        raise OSError(18, "Invalid cross-device link")

    real_writev = os.writev

    def short_writev(fd, buffers):  # the kernel may write less than asked
        buffers = list(buffers)
        total = sum(map(len, buffers))
        return real_writev(fd, [b"".join(buffers)[: max(total // 2, min(total, 1))]]) if total else 0

    monkeypatch.setattr(os, "copy_file_range", no_copy, raising=False)
    monkeypatch.setattr(os, "writev", short_writev)
    assert _build(fashion_spec, catalog, tmp_path / "fallback", 2) == reference
    assert _build(fashion_spec, catalog, tmp_path / "fallback1", 1) == reference


def test_interrupted_multi_worker_build_leaves_nothing(tmp_path: Path, catalog: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer, "CHUNK_ITEMS", 2)
    image = next((catalog / "images").iterdir())
    out = tmp_path / "out"

    def items():
        for n in range(40):
            yield WorkItem(str(n), (image,), (Sample(f"k{n}", [{"role": "user", "content": "<image>\nq"},
                                                               {"role": "assistant", "content": "a"}],
                                                     "t", "s", str(n), 1),), n + 1, "f")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_shards(items(), BuildOptions(out=out, workers=2, progress=False), {})
    assert list(tmp_path.iterdir()) == [catalog]
