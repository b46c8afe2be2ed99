"""Hugging Face `datasets` data (`--format hf`) → the same `Sample` records as the open-domain instruction formats.

An input is a `save_to_disk` folder (one Dataset, or a DatasetDict and one of its splits) or local parquet files (a
folder of them: its splits inferred from the file names the way `datasets` does). Rows are read as Arrow, so an
`Image` column stays the bytes it was stored as: the shard writer validates and re-encodes every image, as for every
other input. The columns the user names (`HFColumns`) make one conversation per row; a bad row becomes a `Reject`
naming its file, its row (1 = the first row, `ds[0]`), the column and the reason. `datasets` is imported only here,
when used, so the package works without it.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmtrain.data.shards.instruction_formats import RecordError, attach_images, parse_turns
from mmtrain.data.shards.product_tasks import IMAGE_MARK, safe_key_part
from mmtrain.data.shards.records import (DUPLICATE_ID, MALFORMED_ROW, MISSING_FIELD, MISSING_IMAGE, NOT_UTF8, Reject,
                                         Sample, WorkItem)
from mmtrain.errors import UserError

HF_FORMAT = "hf"
DEFAULT_SPLIT = "train"
CAPTION_PROMPT = "Describe the product."
_BATCH_ROWS = 64  # rows per Arrow batch: few enough to hold their images in memory, many enough to amortise the calls
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


def import_datasets() -> Any:
    """The `datasets` module, or a UserError saying how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise UserError("--format hf needs the Hugging Face `datasets` library: pip install datasets "
                        "(or pip install 'mmtrain[hf]')") from exc
    return datasets


@dataclass(frozen=True)
class HFColumns:
    """Which columns make a row's sample; exactly one of `text` and `conversation`.

    `text`: 1 column → a caption (user: image + CAPTION_PROMPT, assistant: the column); 2 → question, answer;
    3 → Alpaca's instruction, input (may be empty), output. `conversation`: one column holding a LLaVA / ShareGPT turn
    list ({from, value} or {role, content} items, or that list as a JSON string). `image`: image bytes, a
    `datasets.Image` ({bytes, path}), a path relative to the images folder, or a list of these. `id`: a unique id per
    row for the sample's key and the train/val split (default: the row number).
    """

    text: tuple[str, ...] = ()
    conversation: str | None = None
    image: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if bool(self.text) == bool(self.conversation):
            raise UserError("--format hf needs either --text-columns or --conversation-column (one of them)")
        if len(self.text) > 3:
            raise UserError(f"--text-columns takes 1 (caption), 2 (question answer) or 3 (instruction input output) "
                            f"columns, got {len(self.text)}: {list(self.text)}")
        if len(self.text) == 1 and not self.image:
            raise UserError(f"one --text-columns column ({self.text[0]!r}) is a caption of the image: "
                            "it needs --image-column")
        if len(set(self.names())) != len(self.names()):
            raise UserError(f"--format hf: a column is named twice in {self.names()}")

    def names(self) -> list[str]:
        """Every column named, in a fixed order (the ones the rows are read with)."""
        return [c for c in (self.id, self.image, *self.text, self.conversation) if c]

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class HFInput:
    """An opened input: its rows (a Dataset, or a streaming IterableDataset over parquet) and where they come from."""

    rows: Any
    parts: tuple[tuple[str, int], ...]
    """(the file rejects name, its number of rows) in reading order: a save_to_disk folder is one part."""
    columns: tuple[dict[str, str], ...]
    """The columns of each part: name → Arrow type."""
    root: Path
    """The folder image paths are relative to unless --images says otherwise."""
    split: str | None

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def check_columns(self, names: Sequence[str]) -> None:
        """Fail before any row if a part lacks a named column or holds it as another type than the first part."""
        for (file, _), have in zip(self.parts, self.columns):
            missing = [c for c in names if c not in have]
            if missing:
                raise UserError(f"{file}: no column {missing[0]!r} (its columns: {', '.join(have)})")
            other = [c for c in names if have[c] != self.columns[0][c]]
            if other:
                raise UserError(f"{file}: column {other[0]!r} is {have[other[0]]}, but {self.parts[0][0]} has "
                                f"{self.columns[0][other[0]]}")


def _refuse_missing(raw: str) -> UserError:
    if _HUB_ID.match(raw) or "://" in raw:
        name = raw.removeprefix("hf://").removeprefix("datasets/")
        return UserError(f"--input {raw}: no such local file or folder. --format hf reads local data only and "
                         f"downloads nothing; for a Hub dataset download it first (hf download {name} "
                         "--repo-type dataset --local-dir DIR) and pass DIR")
    return UserError(f"--input {raw}: no such file or folder")


def open_hf_input(inputs: Sequence[str | Path], split: str | None = None) -> HFInput:
    """Open one save_to_disk / parquet folder or one or more parquet files; `split` picks a DatasetDict's or a parquet
    folder's split (default train)."""
    if not inputs:
        raise UserError("--format hf needs --input (a save_to_disk folder, or parquet files or a folder of them)")
    datasets = import_datasets()
    paths = [Path(p) for p in inputs]
    for raw, path in zip(inputs, paths):
        if not path.exists():
            raise _refuse_missing(str(raw))
    if any(p.is_dir() for p in paths):
        if len(paths) > 1:
            raise UserError("--format hf --input takes one folder, or one or more .parquet files")
        folder = paths[0]
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return _open_saved(datasets, folder, split)
        return _open_parquet(datasets, _parquet_split(datasets, folder, split), folder, split or DEFAULT_SPLIT)
    other = [p for p in paths if p.suffix != ".parquet"]
    if other:
        raise UserError(f"{other[0]}: --format hf reads .parquet files, a folder of them, or a save_to_disk folder")
    if split is not None:
        raise UserError("--hf-split picks a split of a DatasetDict or a parquet folder; parquet files named one by one "
                        "are read as one split")
    return _open_parquet(datasets, paths, paths[0].parent, None)


def _open_saved(datasets: Any, folder: Path, split: str | None) -> HFInput:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder}: cannot load this save_to_disk folder: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        name = split or DEFAULT_SPLIT
        if name not in loaded:
            raise UserError(f"{folder} is a DatasetDict without a split {name!r}; its splits: {', '.join(loaded)} "
                            "(pick one with --hf-split)")
        loaded, file = loaded[name], str(folder / name)
    elif split is not None:
        raise UserError(f"{folder} is one Dataset (save_to_disk), not a DatasetDict: it has no splits for --hf-split")
    else:
        name, file = None, str(folder)
    types = {field.name: str(field.type) for field in loaded.data.schema}
    return HFInput(loaded, ((file, len(loaded)),), (types,), folder, name)


def _parquet_split(datasets: Any, folder: Path, split: str | None) -> list[Path]:
    """The .parquet files of one split of `folder`, split names inferred from file names as `load_dataset` does."""
    with tempfile.TemporaryDirectory(prefix="mmtrain-hf-") as cache:  # datasets writes a lock file there
        try:
            builder = datasets.load_dataset_builder("parquet", data_dir=str(folder), cache_dir=cache)
        except FileNotFoundError:
            builder = None
    splits = {str(name): [Path(f) for f in files if str(f).endswith(".parquet")]
              for name, files in (builder.config.data_files.items() if builder else ())}
    splits = {name: files for name, files in splits.items() if files}
    if not splits:
        raise UserError(f"{folder}: neither a save_to_disk folder (state.json or dataset_dict.json) nor a folder of "
                        ".parquet files")
    name = split or DEFAULT_SPLIT
    if name not in splits:
        raise UserError(f"{folder}: no parquet files of split {name!r}; its splits (from the file names): "
                        f"{', '.join(splits)} (pick one with --hf-split)")
    return splits[name]


def _open_parquet(datasets: Any, files: list[Path], root: Path, split: str | None) -> HFInput:
    # pyarrow comes with datasets: like it, imported only when --format hf runs
    import pyarrow
    import pyarrow.parquet as pq

    parts, columns = [], []
    for file in files:
        try:
            meta = pq.read_metadata(file)
        except (OSError, pyarrow.ArrowException) as exc:
            raise UserError(f"{file}: not a readable parquet file: {exc}") from exc
        parts.append((str(file), meta.num_rows))
        columns.append({field.name: str(field.type) for field in meta.schema.to_arrow_schema()})
    with tempfile.TemporaryDirectory(prefix="mmtrain-hf-") as cache:  # streaming: nothing is cached but a lock file
        rows = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True,
                                     cache_dir=cache)
    return HFInput(rows, tuple(parts), tuple(columns), root, split)


def _rows(source: HFInput, names: list[str]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, row in that file, record) for every row in order; images and lists as Arrow stores them."""
    import pyarrow  # comes with datasets: imported only when --format hf runs

    parts = iter(source.parts)
    file, left, row = "", 0, 0
    batches = source.rows.select_columns(names).with_format("arrow").iter(batch_size=_BATCH_ROWS)
    while True:
        try:
            table = next(batches)
        except StopIteration:
            return
        except (OSError, TypeError, ValueError, pyarrow.ArrowException) as exc:  # a file cut short, a cast failing
            raise UserError(f"{file or source.parts[0][0]}: cannot read rows after row {row}: {exc}") from exc
        for record in table.to_pylist():
            while not left:
                file, left = next(parts)
                row = 0
            row, left = row + 1, left - 1
            yield file, row, record


def _text(value: Any, column: str) -> str:
    """A text cell, stripped; numbers as they print, bytes only as UTF-8."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(NOT_UTF8, f"column {column!r}: {exc}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int, float)):
        raise RecordError(MALFORMED_ROW, f"column {column!r} holds a {type(value).__name__}, not text")
    return str(value).strip()


def _text_turns(record: dict[str, Any], columns: tuple[str, ...]) -> list[dict[str, str]]:
    texts = [_text(record[c], c) for c in columns]
    optional = 1 if len(columns) == 3 else None  # Alpaca's input
    empty = [c for i, (c, t) in enumerate(zip(columns, texts)) if not t and i != optional]
    if empty:
        raise RecordError(MISSING_FIELD, f"empty column {empty[0]!r}")
    if len(texts) == 1:
        prompt, answer = CAPTION_PROMPT, texts[0]
    elif len(texts) == 2:
        prompt, answer = texts
    else:
        prompt, answer = texts[0] + (f"\n\n{texts[1]}" if texts[1] else ""), texts[2]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _conversation_turns(value: Any, column: str) -> list[dict[str, str]]:
    if isinstance(value, (str, bytes)):  # a turn list stored as JSON text
        text = _text(value, column)
        try:
            value = json.loads(text) if text else None
        except json.JSONDecodeError as exc:
            raise RecordError(MALFORMED_ROW, f"column {column!r} is text but not a JSON turn list: {exc}") from None
    if value is None or value == []:
        raise RecordError(MISSING_FIELD, f"empty column {column!r}")
    if not isinstance(value, list):
        raise RecordError(MALFORMED_ROW, f"column {column!r} holds a {type(value).__name__}, not a list of turns")
    # Arrow gives every turn every key of the column's struct type: a null key is an absent one.
    turns = [{k: v for k, v in t.items() if v is not None} if isinstance(t, dict) else t for t in value]
    try:
        return parse_turns(turns)
    except RecordError as exc:
        raise RecordError(exc.reason, f"column {column!r}: {exc}") from None


def _image_cell(cell: Any, where: str, root: Path) -> bytes | Path | None:
    """One image as bytes or an existing file; None when the cell is empty."""
    if isinstance(cell, dict):  # a datasets.Image: {bytes, path}
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, (bytes, str)) or cell is None:
        data, path = (cell, None) if isinstance(cell, bytes) else (None, cell)
    else:
        raise RecordError(MALFORMED_ROW, f"{where} holds a {type(cell).__name__}, not image bytes or a path")
    if data:
        return bytes(data)
    if path and path.strip():
        file = root / path.strip()
        if not file.is_file():
            raise RecordError(MISSING_IMAGE, f"{where}: no such file {file}")
        return file
    return None


def _image_sources(value: Any, column: str, root: Path) -> list[bytes | Path]:
    """The row's images (one cell, or a list of them); [] when the cell is empty, a reject for an empty list item."""
    if not isinstance(value, list):
        one = _image_cell(value, f"column {column!r}", root)
        return [] if one is None else [one]
    out = []
    for i, cell in enumerate(value, start=1):
        one = _image_cell(cell, f"column {column!r}, image {i}", root)
        if one is None:
            raise RecordError(MISSING_FIELD, f"column {column!r}, image {i} is empty")
        out.append(one)
    return out


def _row_item(record: dict[str, Any], columns: HFColumns, root: Path, ordinal: int, row: int, file: str,
              seen: dict[str, tuple[str, int]]) -> WorkItem | Reject:
    """One row → its WorkItem, or the Reject naming why not (the id is reserved only by a good row)."""
    record_id = None
    try:
        if columns.id:
            record_id = _text(record[columns.id], columns.id) or None
            if record_id is None:
                raise RecordError(MISSING_FIELD, f"empty id column {columns.id!r}")
        if columns.conversation:
            turns = _conversation_turns(record[columns.conversation], columns.conversation)
        else:
            turns = _text_turns(record, columns.text)
        key = f"{HF_FORMAT}_{safe_key_part(record_id)}" if record_id else f"{HF_FORMAT}_r{ordinal:08d}"
        if key in seen:
            first_file, first_row = seen[key]
            raise RecordError(DUPLICATE_ID, f"id {record_id!r} already used by row {first_row}"
                                            + (f" of {first_file}" if first_file != file else ""))
        images = _image_sources(record[columns.image], columns.image, root) if columns.image else []
        marks = sum(t["content"].count(IMAGE_MARK) for t in turns)
        if columns.image and not images and (columns.text or marks):
            raise RecordError(MISSING_FIELD, f"empty image column {columns.image!r}")
        attach_images(turns, len(images))
    except RecordError as exc:
        return Reject(row, record_id, exc.reason, str(exc), file)
    seen[key] = (file, row)
    sample = Sample(key, turns, "multimodal" if images else "text", HF_FORMAT, None, len(images))
    # image_paths carries bytes as well as files: the writer's reencode_image takes both
    return WorkItem(record_id or key, tuple(images), (sample,), row, file)  # type: ignore[arg-type]


def hf_items(source: HFInput, columns: HFColumns, images_root: str | Path | None = None
             ) -> Iterator[WorkItem | Reject]:
    """One WorkItem per good row (split by its id) and a Reject per bad one, in row order."""
    source.check_columns(columns.names())
    root = Path(images_root) if images_root is not None else source.root
    seen: dict[str, tuple[str, int]] = {}
    for ordinal, (file, row, record) in enumerate(_rows(source, columns.names()), start=1):
        yield _row_item(record, columns, root, ordinal, row, file, seen)


def hf_source_meta(inputs: Sequence[str | Path], source: HFInput, columns: HFColumns,
                   images: str | Path | None) -> dict[str, Any]:
    """The manifest's `source` entry of an hf build: what was read, which split, which columns."""
    return {"kind": "format", "format": HF_FORMAT, "input": [str(p) for p in inputs],
            "images": str(images) if images else None, "hf_split": source.split,
            "files": [file for file, _ in source.parts], "columns": columns.to_json()}
