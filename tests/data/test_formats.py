"""LLaVA, Alpaca and ShareGPT files → the same Sample record, bad records rejected by row."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from mmtrain.data.shards.build import build_from_format
from mmtrain.data.shards.instruction_formats import read_format
from mmtrain.data.shards.records import Reject, WorkItem
from mmtrain.data.shards.writer import BuildOptions

LLAVA = [
    {"id": "000001", "image": "cat.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A red square."},
                       {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "No."}]},
    {"id": "000002", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
    {"id": "000003", "image": "missing.png",
     "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
    {"id": "000004", "image": "cat.png",
     "conversations": [{"from": "human", "value": "<image>\n<image>\nx"}, {"from": "gpt", "value": "y"}]},
    {"id": "000001", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "dup"}]},
]


def _fixture_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), (220, 20, 20)).save(tmp_path / "cat.png")
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA), encoding="utf-8")
    (tmp_path / "alpaca.jsonl").write_text(
        json.dumps({"instruction": "Translate", "input": "Hallo", "output": "Hello"}) + "\n"
        + json.dumps({"instruction": "Count to two", "input": "", "output": "1, 2"}) + "\n"
        + json.dumps({"instruction": "no output"}) + "\n", encoding="utf-8")
    (tmp_path / "sharegpt.jsonl").write_bytes(
        json.dumps({"id": "a", "system": "Be brief.", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}).encode() + b"\n"
        + b'{"id": "b", "conversations": [{"from": "alien", "value": "?"}]}\n'
        + b"\xff\xfe not utf-8\n")
    return tmp_path


def test_llava_records(tmp_path: Path) -> None:
    folder = _fixture_dir(tmp_path)
    out = list(read_format("llava", folder / "llava.json"))
    good = [o for o in out if isinstance(o, WorkItem)]
    bad = [(o.row, o.reason) for o in out if isinstance(o, Reject)]
    assert bad == [(3, "missing_image"), (4, "malformed_row"), (5, "duplicate_id")]
    first = good[0].samples[0]
    assert first.conversation == [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                                  {"role": "assistant", "content": "A red square."},
                                  {"role": "user", "content": "Is it round?"},
                                  {"role": "assistant", "content": "No."}]
    assert first.num_images == 1 and good[0].image_paths == (folder / "cat.png",) and first.source == "llava"
    assert good[1].samples[0].num_images == 0 and good[1].samples[0].task == "text"


def test_alpaca_and_sharegpt_records(tmp_path: Path) -> None:
    folder = _fixture_dir(tmp_path)
    alpaca = list(read_format("alpaca", folder / "alpaca.jsonl"))
    assert alpaca[0].samples[0].conversation == [{"role": "user", "content": "Translate\n\nHallo"},
                                                 {"role": "assistant", "content": "Hello"}]
    assert alpaca[1].samples[0].conversation[0]["content"] == "Count to two"
    assert (alpaca[2].row, alpaca[2].reason) == (3, "missing_field")
    share = list(read_format("sharegpt", folder / "sharegpt.jsonl"))
    assert share[0].samples[0].conversation == [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello!"}]
    assert [(r.row, r.reason) for r in share[1:]] == [(2, "malformed_row"), (3, "not_utf8")]


def test_llava_file_builds_into_shards(tmp_path: Path) -> None:
    folder = _fixture_dir(tmp_path)
    summary = build_from_format("llava", folder / "llava.json", None,
                                BuildOptions(out=tmp_path / "out", val_fraction=0.0, progress=False))
    assert summary.rows == 5 and sum(summary.rejects.values()) == 3
    (raw_a, raw_b) = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False))
    assert raw_a["__key__"] == "llava_000001" and json.loads(raw_a["json"])["num_images"] == 1
    assert "0.jpg" in raw_a and not any(k.endswith(".jpg") for k in raw_b)
