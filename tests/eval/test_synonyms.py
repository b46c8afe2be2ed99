"""The catalog spec's `synonyms` (eval only): validated when the spec loads, carried to the eval by the manifest, and
never in the shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eval_helpers import SAMPLE, SPEC
from mmtrain.data.shards.build import build_from_catalog
from mmtrain.data.shards.catalog import CatalogSpec
from mmtrain.data.shards.writer import BuildOptions
from mmtrain.errors import UserError
from mmtrain.eval.baseline import shard_synonyms

BASE = {"name": "t", "id": "sku", "title": "name",
        "attributes": {"columns": ["colour", "fit"], "names": {"fit": "cut"}}}


def spec_yaml(tmp_path: Path, synonyms) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, "synonyms": synonyms}), encoding="utf-8")
    return path


def test_the_shipped_spec_lists_groups_per_attribute():
    spec = CatalogSpec.from_yaml(SPEC)
    assert spec.synonyms["colour"][0] == ["Grey", "Gray"] and spec.synonyms["season"] == [["Fall", "Autumn"]]
    assert spec.to_json()["synonyms"] == spec.synonyms


def test_synonyms_are_optional_and_absent_from_the_manifest_copy_when_empty(tmp_path):
    assert "synonyms" not in CatalogSpec(**BASE).to_json()
    spec = CatalogSpec.from_yaml(spec_yaml(tmp_path, None))  # `synonyms:` with nothing under it
    assert spec.synonyms == {} and "synonyms" not in spec.to_json()
    spec = CatalogSpec.from_yaml(spec_yaml(tmp_path, {"cut": [["Slim", "Slim Fit"]]}))  # display names, after names
    assert spec.to_json()["synonyms"] == {"cut": [["Slim", "Slim Fit"]]}


@pytest.mark.parametrize("synonyms, message", [
    ([["grey", "gray"]], "must map attribute names"),
    ({"size": [["S", "Small"]]}, r"no attribute 'size' \(the spec's attributes: \['colour', 'cut'\]\)"),
    ({"fit": [["S", "Small"]]}, "no attribute 'fit'"),  # the column, not the display name
    ({"colour": ["grey", "gray"]}, "'grey' is not a list of non-empty strings"),
    ({"colour": {"grey": "gray"}}, "must be a list of groups"),
    ({"colour": [[2011, "2011"]]}, "quote values"),
    ({"colour": [["grey", " "]]}, "not a list of non-empty strings"),
    ({"colour": [["Grey", "grey "]]}, "needs two different values"),
    ({"colour": [["grey", "gray"], ["Gray", "slate"]]}, r"\['gray'\] in more than one group"),
])
def test_bad_synonyms_are_refused_when_the_spec_loads(tmp_path, synonyms, message):
    with pytest.raises(UserError, match=message):
        CatalogSpec.from_yaml(spec_yaml(tmp_path, synonyms))


def test_a_spec_without_fixed_attribute_names_takes_any_name():
    spec = CatalogSpec(**{**BASE, "attributes": {"field": "attrs"}, "synonyms": {"material": [["steel", "inox"]]}})
    assert spec.synonyms == {"material": [["steel", "inox"]]}


def test_shards_are_byte_identical_with_or_without_synonyms_and_the_eval_finds_them(tmp_path):
    lines = (SAMPLE / "styles.csv").read_bytes().splitlines(keepends=True)[:21]
    (tmp_path / "styles.csv").write_bytes(b"".join(lines))
    bare = {k: v for k, v in yaml.safe_load(SPEC.read_text(encoding="utf-8")).items() if k != "synonyms"}
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare), encoding="utf-8")
    for name, spec in (("with", SPEC), ("without", tmp_path / "bare.yaml")):
        build_from_catalog(spec, tmp_path / "styles.csv", SAMPLE, BuildOptions(
            out=tmp_path / name, image_size=32, shard_size=40, progress=False, val_fraction=0.2))
    files = {name: {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
             for name in ("with", "without")}
    assert sorted(files["with"]) == sorted(files["without"]) and len(files["with"]) > 2
    assert [n for n in files["with"] if files["with"][n] != files["without"][n]] == ["manifest.json"]
    with_manifest, without_manifest = (json.loads(files[name]["manifest.json"]) for name in ("with", "without"))
    assert with_manifest["source"]["spec"].pop("synonyms") == CatalogSpec.from_yaml(SPEC).synonyms
    assert with_manifest == without_manifest  # the manifests differ by the spec's synonyms only
    assert shard_synonyms(tmp_path / "with").source == "fashion-products"
    assert shard_synonyms(tmp_path / "with").same("colour", "gray", "Grey")
    assert shard_synonyms(tmp_path / "without").source == "none"
