"""`--format hf`: Hugging Face `datasets` data (save_to_disk, DatasetDict, parquet) → the same records, rejects and
manifest as the other inputs; every sample read back through the loader's own reader."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmtrain.cli import main
from mmtrain.data.loader.split_records import iter_shard_samples
from mmtrain.data.shards.build import build_from_hf
from mmtrain.data.shards.hf_datasets import HFColumns, import_datasets
from mmtrain.data.shards.image_encoding import reencode_image
from mmtrain.data.shards.writer import BuildOptions, read_manifest
from mmtrain.errors import UserError

datasets = pytest.importorskip("datasets")


def _image_bytes(colour: tuple[int, int, int], fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


RED_PNG = _image_bytes((220, 20, 20), "PNG")
GREEN_JPEG = _image_bytes((20, 200, 20), "JPEG", (30, 20))
BLUE_PNG = _image_bytes((20, 20, 220), "PNG", (24, 24))
ROWS = [  # product_id, image, question, answer
    ("p1", RED_PNG, "What colour is it?", "Red."),
    ("p2", GREEN_JPEG, "<image>\nWhich colour?", " Green. "),
    ("p3", None, "What colour is it?", "None."),
    ("p4", b"not an image", "What colour is it?", "?"),
    ("p1", BLUE_PNG, "Again?", "Blue."),
    ("p6", RED_PNG, "", "Red."),
    ("p7", BLUE_PNG, "And this one?", "Blue."),
]
QA = HFColumns(text=("question", "answer"), image="image", id="product_id")
QA_FLAGS = ["--text-columns", "question", "answer", "--image-column", "image", "--id-column", "product_id"]


def _products(rows: list[tuple[Any, ...]]) -> Any:
    features = datasets.Features({"product_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string")})
    return datasets.Dataset.from_dict({
        "product_id": [r[0] for r in rows],
        "image": [None if r[1] is None else {"bytes": r[1], "path": None} for r in rows],
        "question": [r[2] for r in rows], "answer": [r[3] for r in rows]}, features=features)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The product rows as a save_to_disk folder, one parquet file, a parquet folder (train in two files + a test
    file), and a DatasetDict folder (train + validation)."""
    root = tmp_path_factory.mktemp("hf")
    ds = _products(ROWS)
    ds.save_to_disk(str(root / "disk"))
    ds.to_parquet(str(root / "products.parquet"))
    (root / "pq" / "data").mkdir(parents=True)
    ds.select(range(4)).to_parquet(str(root / "pq" / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(4, 7)).to_parquet(str(root / "pq" / "data" / "train-00001-of-00002.parquet"))
    _products([("t1", RED_PNG, "Test?", "Yes.")]).to_parquet(str(root / "pq" / "data" / "test-00000-of-00001.parquet"))
    (root / "pq" / "README.md").write_text("# a Hub snapshot keeps its card beside the data\n")
    datasets.DatasetDict({"train": _products(ROWS[:2]), "validation": _products([ROWS[6]])}).save_to_disk(
        str(root / "dict"))
    return {"root": root, "disk": root / "disk", "parquet": root / "products.parquet", "pq": root / "pq",
            "dict": root / "dict"}


def _options(out: Path, **kw: Any) -> BuildOptions:
    return BuildOptions(out=out, val_fraction=kw.pop("val_fraction", 0.0), progress=False,
                        max_reject_fraction=1.0, **kw)


def _samples(folder: Path, split: str = "train") -> list[dict[str, Any]]:
    return list(iter_shard_samples(folder, split))


def _rejects(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_image_feature_rows_round_trip_and_bad_rows_are_named(inputs: dict[str, Path], tmp_path: Path) -> None:
    summary = build_from_hf([inputs["disk"]], QA, None, _options(tmp_path / "out"))
    samples = _samples(tmp_path / "out")
    assert [s["key"] for s in samples] == ["hf_p1", "hf_p2", "hf_p7"]
    assert [s["conversation"] for s in samples] == [
        [{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."}],
        [{"role": "user", "content": "<image>\nWhich colour?"}, {"role": "assistant", "content": "Green."}],
        [{"role": "user", "content": "<image>\nAnd this one?"}, {"role": "assistant", "content": "Blue."}]]
    assert {(s["task"], s["source"], s["product_id"], s["num_images"]) for s in samples} == {
        ("multimodal", "hf", None, 1)}
    assert [s["images"] for s in samples] == [[reencode_image(RED_PNG, 448)], [GREEN_JPEG],
                                              [reencode_image(BLUE_PNG, 448)]]
    assert samples[1]["images"][0] == GREEN_JPEG  # an upright JPEG within --image-size is kept byte for byte

    disk = str(inputs["disk"])
    rejects = _rejects(tmp_path / "out")
    bad_image = rejects.pop(1)
    assert bad_image["detail"].startswith("<bytes>: cannot identify image file")
    assert {k: v for k, v in bad_image.items() if k != "detail"} == {
        "row": 4, "product_id": "hf_p4", "reason": "bad_image", "file": disk}  # the writer names it by key
    assert rejects == [
        {"row": 3, "product_id": "p3", "reason": "missing_field", "detail": "empty image column 'image'", "file": disk},
        {"row": 5, "product_id": "p1", "reason": "duplicate_id", "detail": "id 'p1' already used by row 1",
         "file": disk},
        {"row": 6, "product_id": "p6", "reason": "missing_field", "detail": "empty column 'question'", "file": disk}]
    manifest = read_manifest(tmp_path / "out")
    assert (summary.rows, manifest["rows"]) == (7, 7)
    assert manifest["rejects"] == {"bad_image": 1, "duplicate_id": 1, "missing_field": 2}
    assert manifest["splits"]["train"]["samples"] == manifest["splits"]["train"]["products"] == 3
    assert manifest["splits"]["train"]["tasks"] == {"multimodal": 3}
    assert manifest["source"] == {
        "kind": "format", "format": "hf", "input": [disk], "images": None, "hf_split": None, "files": [disk],
        "columns": {"text": ["question", "answer"], "conversation": None, "image": "image", "id": "product_id"}}


def test_save_to_disk_parquet_file_and_parquet_folder_give_identical_shards(
        inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    base = ["shards", "build", "--format", "hf", *QA_FLAGS, "--val-fraction", "0.4", "--no-progress",
            "--max-reject-fraction", "0.6"]
    assert main(base + ["--input", str(inputs["disk"]), "--out", str(tmp_path / "disk")]) == 0
    assert main(base + ["--input", str(inputs["parquet"]), "--out", str(tmp_path / "parquet")]) == 0
    assert main(base + ["--input", str(inputs["pq"]), "--out", str(tmp_path / "pq"), "--workers", "2"]) == 0
    reference = _tars(tmp_path / "disk")
    assert set(reference) == {"train-000000.tar", "val-000000.tar"}
    assert _tars(tmp_path / "parquet") == reference == _tars(tmp_path / "pq")
    manifests = [read_manifest(tmp_path / name) for name in ("disk", "parquet", "pq")]
    assert len({json.dumps({k: v for k, v in m.items() if k != "source"}, sort_keys=True) for m in manifests}) == 1
    train_files = [str(inputs["pq"] / "data" / f"train-0000{i}-of-00002.parquet") for i in (0, 1)]
    assert manifests[2]["source"]["files"] == train_files and manifests[2]["source"]["hf_split"] == "train"
    # rows are counted per file, as a reader of that file counts them (rejects.jsonl: by row, then reason)
    assert [(r["file"], r["row"], r["reason"]) for r in _rejects(tmp_path / "pq")] == [
        (train_files[1], 1, "duplicate_id"), (train_files[1], 2, "missing_field"), (train_files[0], 3, "missing_field"),
        (train_files[0], 4, "bad_image")]
    assert _rejects(tmp_path / "pq")[0]["detail"] == f"id 'p1' already used by row 1 of {train_files[0]}"
    capsys.readouterr()
    assert main(["shards", "build", "--format", "hf", *QA_FLAGS, "--input", str(inputs["pq"]), "--hf-split", "test",
                 "--out", str(tmp_path / "test"), "--no-progress", "--val-fraction", "0"]) == 0
    assert [s["key"] for s in _samples(tmp_path / "test")] == ["hf_t1"]
    # the project's default --max-reject-fraction (5 %) stops a build with 4 of 7 rows rejected, the shards kept
    capsys.readouterr()
    assert main(base[:-2] + ["--input", str(inputs["parquet"]), "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "57.1% of rows rejected, more than --max-reject-fraction 5.0%" in err
    assert _tars(tmp_path / "strict") == reference
    assert main(["shards", "inspect", str(tmp_path / "disk"), "--samples", "1"]) == 0
    assert "rows read 7, rejects {'bad_image': 1, 'duplicate_id': 1, 'missing_field': 2}" in capsys.readouterr().out


def test_datasetdict_split_is_chosen_and_a_wrong_one_lists_the_splits(inputs: dict[str, Path], tmp_path: Path,
                                                                     capsys) -> None:
    build_from_hf([inputs["dict"]], QA, None, _options(tmp_path / "train"))
    assert [s["key"] for s in _samples(tmp_path / "train")] == ["hf_p1", "hf_p2"]
    summary = build_from_hf([inputs["dict"]], QA, None, _options(tmp_path / "validation"), split="validation")
    assert [s["key"] for s in _samples(tmp_path / "validation")] == ["hf_p7"]
    assert summary.manifest["source"]["hf_split"] == "validation"
    assert summary.manifest["source"]["files"] == [str(inputs["dict"] / "validation")]
    with pytest.raises(UserError, match=r"DatasetDict without a split 'test'; its splits: train, validation"):
        build_from_hf([inputs["dict"]], QA, None, _options(tmp_path / "x"), split="test")
    with pytest.raises(UserError, match=r"no parquet files of split 'validation'; its splits .*: train, test"):
        build_from_hf([inputs["pq"]], QA, None, _options(tmp_path / "x"), split="validation")
    with pytest.raises(UserError, match="is one Dataset .* no splits for --hf-split"):
        build_from_hf([inputs["disk"]], QA, None, _options(tmp_path / "x"), split="train")
    with pytest.raises(UserError, match="parquet files named one by one are read as one split"):
        build_from_hf([inputs["parquet"]], QA, None, _options(tmp_path / "x"), split="train")
    assert not (tmp_path / "x").exists()


def test_caption_alpaca_bytes_and_path_columns(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    (images / "red.png").write_bytes(RED_PNG)
    (images / "green.jpg").write_bytes(GREEN_JPEG)
    features = datasets.Features({"photo": datasets.Value("binary"), "caption": datasets.Value("binary"),
                                  "path": datasets.Value("string"), "instruction": datasets.Value("string"),
                                  "input": datasets.Value("string"), "output": datasets.Value("string")})
    datasets.Dataset.from_dict({
        "photo": [RED_PNG, GREEN_JPEG, b"", RED_PNG],
        "caption": [b"A red square.", "A green square.".encode(), b"x", b"\xff\xfe bad"],
        "path": ["red.png", "green.jpg", "red.png", "nowhere.png"],
        "instruction": ["Name the colour.", "Name the colour.", "", "a"],
        "input": ["", "Answer in one word.", "x", ""],
        "output": ["Red.", "Green.", "y", "b"]}, features=features).save_to_disk(str(tmp_path / "ds"))
    ds = str(tmp_path / "ds")

    build_from_hf([ds], HFColumns(text=("caption",), image="photo"), None, _options(tmp_path / "caption"))
    samples = _samples(tmp_path / "caption")
    assert [s["key"] for s in samples] == ["hf_r00000001", "hf_r00000002"]  # no id column: the row number
    assert [s["conversation"] for s in samples] == [
        [{"role": "user", "content": "<image>\nDescribe the product."}, {"role": "assistant", "content": text}]
        for text in ("A red square.", "A green square.")]
    assert [s["images"] for s in samples] == [[reencode_image(RED_PNG, 448)], [GREEN_JPEG]]
    assert [(r["row"], r["product_id"], r["reason"], r["detail"]) for r in _rejects(tmp_path / "caption")] == [
        (3, None, "missing_field", "empty image column 'photo'"),
        (4, None, "not_utf8",
         "column 'caption': 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte")]

    build_from_hf([ds], HFColumns(text=("instruction", "input", "output"), image="path"), images,
                  _options(tmp_path / "alpaca"))
    samples = _samples(tmp_path / "alpaca")
    assert [s["conversation"][0]["content"] for s in samples] == [
        "<image>\nName the colour.", "<image>\nName the colour.\n\nAnswer in one word."]
    assert [s["images"] for s in samples] == [[reencode_image(RED_PNG, 448)], [GREEN_JPEG]]
    assert [(r["row"], r["reason"], r["detail"]) for r in _rejects(tmp_path / "alpaca")] == [
        (3, "missing_field", "empty column 'instruction'"),
        (4, "missing_image", f"column 'path': no such file {images / 'nowhere.png'}")]
    assert read_manifest(tmp_path / "alpaca")["source"]["images"] == str(images)


def test_conversation_column_reuses_the_llava_sharegpt_parsing(tmp_path: Path) -> None:
    (tmp_path / "blue.png").write_bytes(BLUE_PNG)
    (tmp_path / "red.png").write_bytes(RED_PNG)
    human, gpt = (lambda text: {"from": "human", "value": text}), (lambda text: {"from": "gpt", "value": text})
    datasets.Dataset.from_list([
        {"id": 1, "images": ["blue.png"], "conversations": [human("<image>\nWhat is it?"), gpt("A blue square."),
                                                             human("Round?"), gpt("No.")]},
        {"id": 2, "images": [], "conversations": [{"role": "user", "content": "Say hi"},
                                                   {"role": "assistant", "content": "hi"}]},
        {"id": 3, "images": ["missing.png"], "conversations": [human("<image>\nx"), gpt("y")]},
        {"id": 4, "images": [], "conversations": [human("<image>\nx"), gpt("y")]},
        {"id": 5, "images": [], "conversations": [{"from": "alien", "value": "?"}]},
        {"id": 6, "images": ["blue.png", "red.png"], "conversations": [human("Compare."), gpt("Blue, red.")]},
    ]).to_parquet(str(tmp_path / "llava.parquet"))
    columns = HFColumns(conversation="conversations", image="images", id="id")
    build_from_hf([tmp_path / "llava.parquet"], columns, None, _options(tmp_path / "out"))
    samples = {s["key"]: s for s in _samples(tmp_path / "out")}
    assert list(samples) == ["hf_1", "hf_2", "hf_6"]
    assert samples["hf_1"]["conversation"] == [
        {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A blue square."},
        {"role": "user", "content": "Round?"}, {"role": "assistant", "content": "No."}]
    assert (samples["hf_2"]["task"], samples["hf_2"]["num_images"], samples["hf_2"]["images"]) == ("text", 0, [])
    assert samples["hf_6"]["conversation"][0] == {"role": "user", "content": "<image>\n<image>\nCompare."}
    assert samples["hf_6"]["images"] == [reencode_image(BLUE_PNG, 448), reencode_image(RED_PNG, 448)]
    assert [(r["row"], r["product_id"], r["reason"], r["detail"]) for r in _rejects(tmp_path / "out")] == [
        (3, "3", "missing_image", f"column 'images', image 1: no such file {tmp_path / 'missing.png'}"),
        (4, "4", "missing_field", "empty image column 'images'"),
        (5, "5", "malformed_row", "column 'conversations': turn 0: unknown speaker 'alien' or no text")]

    datasets.Dataset.from_dict({"conv": [json.dumps([human("Hi"), gpt("Hello")]), "[not json", ""]}).save_to_disk(
        str(tmp_path / "text"))
    build_from_hf([tmp_path / "text"], HFColumns(conversation="conv"), None, _options(tmp_path / "text-out"))
    assert [s["conversation"] for s in _samples(tmp_path / "text-out")] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    assert [(r["row"], r["reason"], r["detail"].split(":")[0]) for r in _rejects(tmp_path / "text-out")] == [
        (2, "malformed_row", "column 'conv' is text but not a JSON turn list"),
        (3, "missing_field", "empty column 'conv'")]


def test_bad_invocations_stop_before_writing(inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    cases = [
        (["--input", "someone/products-vqa", *QA_FLAGS],
         "--input someone/products-vqa: no such local file or folder. --format hf reads local data only and downloads "
         "nothing; for a Hub dataset download it first (hf download someone/products-vqa --repo-type dataset "
         "--local-dir DIR) and pass DIR"),
        (["--input", str(inputs["disk"]), "--text-columns", "question", "answer", "--image-column", "photo"],
         f"{inputs['disk']}: no column 'photo' (its columns: product_id, image, question, answer)"),
        (["--input", str(inputs["disk"]), "--image-column", "image"],
         "needs either --text-columns or --conversation-column"),
        (["--input", str(inputs["disk"]), "--text-columns", "answer"], "it needs --image-column"),
        (["--input", str(inputs["root"] / "dict" / "dataset_dict.json"), *QA_FLAGS], "reads .parquet files"),
        (["--input", str(inputs["disk"]), str(inputs["parquet"]), *QA_FLAGS], "takes one folder"),
    ]
    for flags, message in cases:
        capsys.readouterr()
        assert main(["shards", "build", "--format", "hf", "--out", str(out), "--no-progress", *flags]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    datasets.Dataset.from_dict({"q": ["a"], "a": ["x"]}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"q": [[1]], "a": ["x"]}).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:-9])
    qa = HFColumns(text=("q", "a"))
    with pytest.raises(UserError, match=f"{tmp_path / 'b.parquet'}: column 'q' is list<element: int64>, but "
                                        f"{tmp_path / 'a.parquet'} has string"):
        build_from_hf([tmp_path / "a.parquet", tmp_path / "b.parquet"], qa, None, _options(out))
    with pytest.raises(UserError, match=f"{tmp_path / 'cut.parquet'}: not a readable parquet file"):
        build_from_hf([tmp_path / "a.parquet", tmp_path / "cut.parquet"], qa, None, _options(out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a save_to_disk folder .* nor a folder of .parquet files"):
        build_from_hf([tmp_path / "empty"], QA, None, _options(out))
    capsys.readouterr()
    assert main(["shards", "build", "--format", "llava", "--input", "x.json", "--image-column", "image",
                 "--out", str(out)]) == 2
    assert "--image-column is for --format hf" in capsys.readouterr().err
    assert main(["shards", "build", "--format", "llava", "--input", "a.json", "b.json", "--out", str(out)]) == 2
    assert "--format llava reads one --input file, got 2" in capsys.readouterr().err


def test_the_package_works_without_datasets(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"pip install datasets \(or pip install 'mmtrain\[hf\]'\)"):
        import_datasets()
    code = ("import sys; sys.modules['datasets'] = None\n"
            "import mmtrain.data.shards.build, mmtrain.commands.shards\n"
            "from mmtrain.cli import main\n"
            "sys.exit(main(['shards', 'build', '--format', 'hf', '--input', '.', '--text-columns', 'a', 'b', "
            "'--out', 'x']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--format hf needs the Hugging Face `datasets` library: pip install datasets" in done.stderr
