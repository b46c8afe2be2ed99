"""Open-domain instruction data (LLaVA conversation JSON, Alpaca, ShareGPT) → the same `Sample` record as catalogs.

So the text-only and multimodal instruction sets of mPLUG-Owl / MultiModal-GPT flow through one writer and one loader.
Each malformed record becomes a `Reject` naming its row; the rest are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from mmtrain.data.shards.product_tasks import IMAGE_MARK, safe_key_part
from mmtrain.data.shards.records import (DUPLICATE_ID, MALFORMED_ROW, MISSING_FIELD, MISSING_IMAGE, NOT_UTF8, Reject,
                                  Sample, WorkItem)
from mmtrain.errors import UserError

FORMATS = ("llava", "alpaca", "sharegpt")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
              "model": "assistant", "chatgpt": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that cannot become a sample; `reason` is one of the reject reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (row number, parsed record) from a JSON list or a JSONL file; unparseable rows come as RecordError."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a valid JSON list: {exc}") from exc
        yield from enumerate(records, start=1)
        return
    for row, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield row, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield row, RecordError(NOT_UTF8, str(exc))
        except json.JSONDecodeError as exc:
            yield row, RecordError(MALFORMED_ROW, f"not JSON: {exc}")


def parse_turns(raw_turns: Any) -> list[dict[str, str]]:
    """A LLaVA / ShareGPT turn list ({from, value} or {role, content}) → [{role, content}]; RecordError if unusable."""
    if not isinstance(raw_turns, list) or not raw_turns:
        raise RecordError(MISSING_FIELD, "no 'conversations' list")
    turns = []
    for i, turn in enumerate(raw_turns):
        if not isinstance(turn, dict):
            raise RecordError(MALFORMED_ROW, f"turn {i} is not an object")
        speaker = str(turn.get("from", turn.get("role", ""))).lower()
        text = turn.get("value", turn.get("content"))
        if speaker not in ROLE_NAMES or not isinstance(text, str):
            raise RecordError(MALFORMED_ROW, f"turn {i}: unknown speaker {speaker!r} or no text")
        turns.append({"role": ROLE_NAMES[speaker], "content": text.strip()})
    if not any(t["role"] == "assistant" and t["content"] for t in turns):
        raise RecordError(MISSING_FIELD, "no assistant turn with text")
    return turns


def _image_list(record: dict[str, Any]) -> list[str]:
    value = record.get("image", record.get("images"))
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def attach_images(turns: list[dict[str, str]], n_images: int) -> None:
    """LLaVA puts `<image>` in the first human turn; records that omit it get one mark per image there."""
    marks = sum(t["content"].count(IMAGE_MARK) for t in turns)
    if marks == 0 and n_images:
        first_user = next(t for t in turns if t["role"] == "user")
        first_user["content"] = "\n".join([IMAGE_MARK] * n_images + [first_user["content"]])
    elif marks != n_images:
        raise RecordError(MALFORMED_ROW, f"{marks} {IMAGE_MARK} marks but {n_images} images")


def _llava_or_sharegpt(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    turns = parse_turns(record.get("conversations", record.get("messages")))
    if isinstance(record.get("system"), str) and record["system"].strip():
        turns.insert(0, {"role": "system", "content": record["system"].strip()})
    images = _image_list(record)
    attach_images(turns, len(images))
    return turns, images


def _alpaca(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    instruction, extra, output = (record.get(k) for k in ("instruction", "input", "output"))
    if not isinstance(instruction, str) or not instruction.strip() or not isinstance(output, str) or not output.strip():
        raise RecordError(MISSING_FIELD, "needs non-empty 'instruction' and 'output'")
    prompt = instruction.strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}], []


PARSERS: dict[str, Callable[[dict[str, Any]], tuple[list[dict[str, str]], list[str]]]] = {
    "llava": _llava_or_sharegpt, "sharegpt": _llava_or_sharegpt, "alpaca": _alpaca,
}


def read_format(fmt: str, path: str | Path, images_root: str | Path | None = None) -> Iterator[WorkItem | Reject]:
    """Yield one WorkItem per good record (split by its id) and a Reject per bad one, in file order."""
    if fmt not in PARSERS:
        raise UserError(f"unknown format {fmt!r}; known: {list(PARSERS)}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    root = Path(images_root) if images_root is not None else path.parent
    seen: set[str] = set()
    for row, record in _iter_records(path):
        record_id = None
        try:
            if isinstance(record, RecordError):
                raise record
            if not isinstance(record, dict):
                raise RecordError(MALFORMED_ROW, "not a JSON object")
            record_id = str(record["id"]) if record.get("id") not in (None, "") else None
            turns, images = PARSERS[fmt](record)
            key = f"{fmt}_{safe_key_part(record_id)}" if record_id else f"{fmt}_r{row:08d}"
            if key in seen:
                raise RecordError(DUPLICATE_ID, f"id {record_id!r} already used")
            image_paths = tuple(root / rel for rel in images)
            missing = [str(p) for p in image_paths if not p.is_file()]
            if missing:
                raise RecordError(MISSING_IMAGE, f"no such file {missing[0]}")
        except RecordError as exc:
            yield Reject(row, record_id, exc.reason, str(exc), str(path))
            continue
        seen.add(key)
        task = "multimodal" if image_paths else "text"
        sample = Sample(key, turns, task, fmt, None, len(image_paths))
        yield WorkItem(record_id or key, image_paths, (sample,), row, str(path))
