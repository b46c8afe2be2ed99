"""Catalog readers: a raw product catalog (CSV or JSONL) + a column spec → validated `Product`s and `Reject`s.

A spec (YAML under `shards/catalogs/`) names which column is what, so one reader serves every catalog. A bad row never
crashes a build: it becomes a `Reject` naming the row and the reason, and every good row is still yielded.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


from mmtrain.errors import UserError
from mmtrain.yamlfile import read_yaml_mapping

from mmtrain.data.shards.records import (DUPLICATE_ID, MALFORMED_ROW, MISSING_FIELD, MISSING_IMAGE, NOT_UTF8,
                                  Reject)


@dataclass(frozen=True)
class Product:
    """One validated catalog row. `attributes` keeps the spec's order and drops empty values."""

    product_id: str
    title: str
    description: str
    category: tuple[str, ...]
    attributes: dict[str, str]
    image_paths: tuple[Path, ...]
    row: int


@dataclass
class CatalogSpec:
    """Which column of a catalog is what. Column names are those of the CSV header or the JSONL keys.

    category: either `columns` (coarse → fine) or one `column` split on `separator`.
    attributes: either `columns` (each a key) or one `field` holding a JSON object; `names` renames keys for display.
    images: either a `pattern` such as `images/{id}.jpg` (formatted with the row's columns, relative to `--images`)
            or a `column` of relative paths split on `separator` (several images per product).
    synonyms: for the eval only, `{attribute display name: [[value, same value, ...], ...]}`: groups of values that
              count as the same answer when attributes are scored (docs/eval.md). They never change a shard; the
              manifest's copy of the spec carries them to the eval.
    """

    name: str
    id: str
    title: str
    format: str = "csv"
    delimiter: str = ","
    description: str | None = None
    category: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    synonyms: dict[str, list[list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in ("csv", "jsonl"):
            raise UserError(f"catalog spec {self.name!r}: format must be csv or jsonl, not {self.format!r}")
        if self.category and not ({"columns", "column"} & set(self.category)):
            raise UserError(f"catalog spec {self.name!r}: category needs 'columns' or 'column' + 'separator'")
        if self.attributes and not ({"columns", "field"} & set(self.attributes)):
            raise UserError(f"catalog spec {self.name!r}: attributes needs 'columns' or 'field'")
        if self.images and not ({"pattern", "column"} & set(self.images)):
            raise UserError(f"catalog spec {self.name!r}: images needs 'pattern' or 'column'")
        self.synonyms = self.synonyms or {}
        self._check_synonyms()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CatalogSpec":
        path = Path(path)
        raw = read_yaml_mapping(path, "catalog spec")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise UserError(f"catalog spec {path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        for required in ("name", "id", "title"):
            if required not in raw:
                raise UserError(f"catalog spec {path}: missing required key {required!r}")
        return cls(**raw)

    def _check_synonyms(self) -> None:
        """`synonyms` maps attribute display names (one of the spec's, where its columns name them) to lists of groups
        of at least two distinct strings; no value (case and spacing aside) is in two groups of one attribute."""
        where = f"catalog spec {self.name!r}: synonyms"
        if not isinstance(self.synonyms, dict):
            raise UserError(f"{where} must map attribute names to lists of value groups")
        known = [self.attribute_name(c) for c in self.attributes.get("columns", [])]
        for attribute, groups in self.synonyms.items():
            if known and attribute not in known:
                raise UserError(f"{where}: no attribute {attribute!r} (the spec's attributes: {known})")
            if not isinstance(groups, list):
                raise UserError(f"{where}.{attribute} must be a list of groups such as [[grey, gray]]")
            seen: set[str] = set()
            for group in groups:
                if not (isinstance(group, list) and all(isinstance(v, str) and v.strip() for v in group)):
                    raise UserError(f"{where}.{attribute}: {group!r} is not a list of non-empty strings (quote "
                                    "values YAML would read as numbers or booleans)")
                folded = {" ".join(v.lower().split()) for v in group}
                if len(folded) < 2:
                    raise UserError(f"{where}.{attribute}: {group!r} needs two different values")
                if folded & seen:
                    raise UserError(f"{where}.{attribute}: {sorted(folded & seen)} in more than one group")
                seen |= folded

    def to_json(self) -> dict[str, Any]:
        """The spec as the manifest records it (`synonyms` only when there are some, so specs without them record
        what they always did)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "synonyms" or self.synonyms}

    def referenced_columns(self) -> list[str]:
        """Every column the spec names, so a missing one fails before any row is read."""
        cols = [self.id, self.title]
        if self.description:
            cols.append(self.description)
        cols += list(self.category.get("columns", [])) + ([self.category["column"]] if "column" in self.category else [])
        cols += list(self.attributes.get("columns", [])) + ([self.attributes["field"]] if "field" in self.attributes else [])
        if "column" in self.images:
            cols.append(self.images["column"])
        if "pattern" in self.images:
            cols += [name for _, name, _, _ in string.Formatter().parse(self.images["pattern"]) if name]
        return list(dict.fromkeys(cols))

    def attribute_name(self, key: str) -> str:
        return str(self.attributes.get("names", {}).get(key, key))


def _has_surrogates(text: str) -> bool:
    """True if decoding with surrogateescape met bytes that are not UTF-8 (encoding back then fails, at C speed)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_csv_rows(path: Path, spec: CatalogSpec) -> Iterator[tuple[int, dict[str, str] | Reject]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=spec.delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{path}: the catalog is empty (no header row)") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in spec.referenced_columns() if c not in header]
        if missing:
            raise UserError(f"{path}: spec {spec.name!r} names columns the catalog lacks: {missing} "
                            f"(catalog columns: {header})")
        for row_no, fields in enumerate(reader, start=1):
            if not fields:
                continue
            if len(fields) != len(header):
                yield row_no, Reject(row_no, fields[0] if fields else None, MALFORMED_ROW,
                                     f"line {reader.line_num}: {len(fields)} fields, header has {len(header)}",
                                     str(path))
                continue
            yield row_no, dict(zip(header, fields))


def _read_jsonl_rows(path: Path, spec: CatalogSpec) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    rows: list[tuple[int, dict[str, Any] | Reject]] = []
    seen_keys: set[str] = set()
    with open(path, "rb") as fh:
        for row_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append((row_no, Reject(row_no, None, NOT_UTF8, str(exc), str(path))))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append((row_no, Reject(row_no, None, MALFORMED_ROW, f"not JSON: {exc}", str(path))))
                continue
            if not isinstance(record, dict):
                rows.append((row_no, Reject(row_no, None, MALFORMED_ROW, "not a JSON object", str(path))))
                continue
            seen_keys.update(record)
            rows.append((row_no, record))
    missing = [c for c in spec.referenced_columns() if c not in seen_keys]
    if rows and missing:
        raise UserError(f"{path}: spec {spec.name!r} names fields no record has: {missing}")
    yield from rows


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _product_from_row(row_no: int, rec: dict[str, Any], spec: CatalogSpec, images_root: Path | None,
                      need_images: bool, path: Path) -> Product | Reject:
    pid = _text(rec.get(spec.id))
    if _has_surrogates("".join(v for v in rec.values() if isinstance(v, str))):
        bad = [k for k, v in rec.items() if isinstance(v, str) and _has_surrogates(v)]
        return Reject(row_no, pid if not _has_surrogates(pid) else None, NOT_UTF8,
                      f"bytes that are not UTF-8 in {bad}", str(path))
    for name, value in (("id", pid), ("title", _text(rec.get(spec.title)))):
        if not value:
            return Reject(row_no, pid or None, MISSING_FIELD, f"empty {name} column {getattr(spec, name)!r}",
                          str(path))

    if "columns" in spec.category:
        category = tuple(_text(rec.get(c)) for c in spec.category["columns"])
    elif "column" in spec.category:
        sep = spec.category.get("separator", ">")
        category = tuple(part.strip() for part in _text(rec.get(spec.category["column"])).split(sep))
    else:
        category = ()
    category = tuple(c for c in category if c)

    attributes: dict[str, str] = {}
    if "columns" in spec.attributes:
        for col in spec.attributes["columns"]:
            value = _text(rec.get(col))
            if value:
                attributes[spec.attribute_name(col)] = value
    elif "field" in spec.attributes:
        raw = rec.get(spec.attributes["field"])
        if isinstance(raw, str) and raw.strip():
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                return Reject(row_no, pid, MALFORMED_ROW, f"attributes field is not JSON: {exc}", str(path))
        if raw and not isinstance(raw, dict):
            return Reject(row_no, pid, MALFORMED_ROW, "attributes field is not a JSON object", str(path))
        for key, value in (raw or {}).items():
            if _text(value):
                attributes[spec.attribute_name(str(key))] = _text(value)

    image_paths: tuple[Path, ...] = ()
    if spec.images:
        if "pattern" in spec.images:
            rels = [spec.images["pattern"].format(**{k: _text(v) for k, v in rec.items()})]
        else:
            value = rec.get(spec.images["column"])
            rels = value if isinstance(value, list) else _text(value).split(spec.images.get("separator", "|"))
        rels = [str(r).strip() for r in rels if str(r).strip()]
        root = images_root or path.parent
        image_paths = tuple(root / r for r in rels)
        if need_images:
            if not image_paths:
                return Reject(row_no, pid, MISSING_FIELD, "no image path", str(path))
            for p in image_paths:
                if not p.is_file():
                    return Reject(row_no, pid, MISSING_IMAGE, f"no such file {p}", str(path))

    return Product(pid, _text(rec.get(spec.title)), _text(rec.get(spec.description)) if spec.description else "",
                   category, attributes, image_paths, row_no)


def read_catalog(path: str | Path, spec: CatalogSpec, images_root: str | Path | None = None,
                 need_images: bool = True) -> Iterator[Product | Reject]:
    """Yield a Product or a Reject for every data row, in file order; the first of duplicate ids wins.

    Raises UserError before any row if the file is missing or the spec names a column the catalog lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"catalog file {path} does not exist")
    rows = _read_csv_rows(path, spec) if spec.format == "csv" else _read_jsonl_rows(path, spec)
    seen: dict[str, int] = {}
    root = Path(images_root) if images_root is not None else None
    for row_no, rec in rows:
        if isinstance(rec, Reject):
            yield rec
            continue
        item = _product_from_row(row_no, rec, spec, root, need_images, path)
        if isinstance(item, Product):
            if item.product_id in seen:
                yield Reject(row_no, item.product_id, DUPLICATE_ID,
                             f"id already used by row {seen[item.product_id]}", str(path))
                continue
            seen[item.product_id] = row_no
        yield item
