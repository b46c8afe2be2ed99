"""Catalog specs and readers: columns → Product, bad rows → Reject with row and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain.data.shards.catalog import CatalogSpec, Product, read_catalog
from mmtrain.data.shards.records import Reject
from mmtrain.errors import UserError


def _spec(**kw) -> CatalogSpec:
    base = dict(name="t", id="sku", title="name")
    base.update(kw)
    return CatalogSpec(**base)


def test_fashion_spec_reads_first_row_exactly(real_catalog: Path, fashion_spec: Path) -> None:
    spec = CatalogSpec.from_yaml(fashion_spec)
    first = next(read_catalog(real_catalog / "styles.csv", spec))
    assert first == Product(
        product_id="15970", title="Turtle Check Men Navy Blue Shirt", description="",
        category=("Apparel", "Topwear", "Shirts"),
        attributes={"gender": "Men", "colour": "Navy Blue", "season": "Fall", "year": "2011", "usage": "Casual"},
        image_paths=(real_catalog / "images" / "15970.jpg",), row=1)


def test_semicolon_csv_with_quoted_fields_and_category_separator(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "cat.csv").write_text(
        'sku;name;desc;path;attrs;pics\n'
        '7;"Shoe; red";"A ""nice"" shoe\nwith two lines";Footwear / Shoes / Sneakers;'
        '"{""colour"": ""red"", ""size"": 42, ""empty"": """"}";a.jpg|b.jpg\n', encoding="utf-8")
    spec = _spec(delimiter=";", description="desc", category={"column": "path", "separator": "/"},
                 attributes={"field": "attrs"}, images={"column": "pics", "separator": "|"})
    (product,) = list(read_catalog(tmp_path / "cat.csv", spec))
    assert product.title == "Shoe; red"
    assert product.description == 'A "nice" shoe\nwith two lines'
    assert product.category == ("Footwear", "Shoes", "Sneakers")
    assert product.attributes == {"colour": "red", "size": "42"}
    assert product.image_paths == (tmp_path / "a.jpg", tmp_path / "b.jpg")


def test_jsonl_catalog_with_dict_attributes_and_image_list(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(b"x")
    lines = [{"sku": 1, "name": "Mug", "cats": "Home>Kitchen", "attrs": {"material": "ceramic"}, "pics": ["1.jpg"]},
             {"sku": 2, "name": "", "cats": "Home", "attrs": {}, "pics": ["1.jpg"]}]
    path = tmp_path / "cat.jsonl"
    path.write_bytes(b"\n".join(json.dumps(x).encode() for x in lines) + b"\n{broken\n")
    spec = _spec(format="jsonl", category={"column": "cats"}, attributes={"field": "attrs"}, images={"column": "pics"})
    out = list(read_catalog(path, spec, images_root=tmp_path / "img"))
    assert isinstance(out[0], Product) and out[0].product_id == "1" and out[0].category == ("Home", "Kitchen")
    assert out[0].attributes == {"material": "ceramic"}
    assert [(r.row, r.reason) for r in out[1:]] == [(2, "missing_field"), (3, "malformed_row")]


def test_spec_naming_a_missing_column_fails_before_any_row(tmp_path: Path) -> None:
    (tmp_path / "cat.csv").write_text("sku,name\n1,a\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"lacks: \['colour'\]"):
        next(read_catalog(tmp_path / "cat.csv", _spec(attributes={"columns": ["colour"]})))


def test_spec_yaml_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nid: a\ntitle: b\ncolour: c\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown keys"):
        CatalogSpec.from_yaml(path)


def test_rejects_carry_row_and_reason(tmp_path: Path) -> None:
    (tmp_path / "1.jpg").write_bytes(b"x")
    (tmp_path / "cat.csv").write_bytes(b"sku,name\n1,a\n1,dup\n2\n3,\xe9t\xe9\n4,\n5,no image\n")
    spec = _spec(images={"pattern": "{sku}.jpg"})
    out = list(read_catalog(tmp_path / "cat.csv", spec))
    assert isinstance(out[0], Product)
    rejects = [(r.row, r.product_id, r.reason) for r in out[1:] if isinstance(r, Reject)]
    assert rejects == [(2, "1", "duplicate_id"), (3, "2", "malformed_row"), (4, "3", "not_utf8"),
                       (5, "4", "missing_field"), (6, "5", "missing_image")]
