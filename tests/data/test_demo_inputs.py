"""The demo's shard sets: built with the options the recipe relies on, and refused when an older demo left others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmtrain.data.shards.writer import read_manifest
from mmtrain.demo import SHARD_SETS, SHORT_ANSWER_TASKS, ShardSet, build_shard_set, check_reusable
from mmtrain.errors import UserError


def _subset(catalog: Path, dest: Path, n: int) -> Path:
    (dest / "images").mkdir(parents=True)
    lines = (catalog / "styles.csv").read_bytes().splitlines(keepends=True)[: n + 1]
    (dest / "styles.csv").write_bytes(b"".join(lines))
    for line in lines[1:]:
        pid = line.split(b",")[0].decode()
        shutil.copy(catalog / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    return dest / "styles.csv"


def test_demo_shard_sets_are_built_as_declared_and_a_stale_one_is_refused(tmp_path: Path, real_catalog: Path) -> None:
    catalog = _subset(real_catalog, tmp_path / "cat", 30)
    spec = SHARD_SETS["sample-mm-qa"]
    assert spec.tasks == SHORT_ANSWER_TASKS and spec.attribute_weights == {"colour": 36.0}
    folder = tmp_path / "shards" / spec.folder
    build_shard_set(folder, spec, catalog)
    manifest = read_manifest(folder)
    assert manifest["source"]["attribute_weights"] == {"colour": 36.0}
    assert manifest["source"]["tasks"] == list(SHORT_ANSWER_TASKS) and manifest["source"]["per_task"] == 2
    check_reusable(folder, spec, catalog)  # what this demo would build: reused as it is
    with pytest.raises(UserError, match="catalog .*other.csv"):  # the same options from another catalog: refused
        check_reusable(folder, spec, tmp_path / "other.csv")

    uniform = ShardSet(spec.folder, spec.tasks, spec.per_task, spec.text_only)
    with pytest.raises(UserError, match=r"attribute_weights \{'colour': 36.0\} \(this demo: \{\}\)"):
        check_reusable(folder, uniform, catalog)
    # a set left by a demo from before the options existed: absent fields read as off, so the weights differ
    for field in ("attribute_weights", "val_every_attribute"):
        manifest["source"].pop(field)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    check_reusable(folder, uniform, catalog)
    with pytest.raises(UserError, match=f"delete {tmp_path}"):
        check_reusable(folder, spec, catalog)
