"""Training on shards in object storage: a 2-rank run reading the tiny set from a local S3 server (moto, reached through
AWS_ENDPOINT_URL from the rank processes) passes the start-up doctor and trains exactly the losses of the same run on
the local copy; and the `shard_*` fetch knobs may change on --resume without --allow-recipe-change."""

from __future__ import annotations

from pathlib import Path

import pytest
from local_s3 import moto_s3
from train_helpers import metrics, stage, write_recipe

from mmtrain.config import recipe_from_dict
from mmtrain.data.remote_files import cache_name
from mmtrain.launching import run_ranks
from mmtrain.train.checkpoint import mark_complete
from mmtrain.train.recipe_change import check_resume

BUCKET = "mmtrain-train"
FETCH = {"shard_retries": 2, "shard_backoff": 0.05, "shard_timeout": 20.0}


@pytest.fixture
def s3_set(tiny_data: dict[str, Path], monkeypatch):
    """s3://BUCKET/mm: a copy of the tiny `mm` set on a moto server in this process; the AWS variables it is reached
    by are set here, so the rank processes inherit them."""
    with moto_s3(monkeypatch, BUCKET, {"mm": tiny_data["mm"]}):
        yield f"s3://{BUCKET}/mm"


def test_a_run_on_s3_shards_trains_the_local_runs_losses(tiny_data, s3_set, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    losses = {}
    for name, shards, fetch in (("local", str(tiny_data["mm"]), {}),
                                ("s3", s3_set, {**FETCH, "shard_cache": str(cache)})):
        spec = stage("s", tiny_data, steps=3, data=[{"shards": shards, "weight": 1.0}])
        spec["loader"].update(fetch)
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_data, [spec])
        log = tmp_path / f"{name}.log"
        result = run_ranks(2, ["--recipe", str(recipe), "--out", str(tmp_path / name)], log=log, timeout=300)
        text = log.read_text()
        assert result.returncode == 0, text[-3000:]
        assert "pre-flight checks failed" not in text and "FAIL" not in text  # the start-up doctor passed
        records = metrics(tmp_path / name)
        assert [m["skipped"] for m in records] == [{}, {}, {}]  # no shard went unreachable
        losses[name] = [(m["step"], m["loss"]) for m in records]
    assert [step for step, _ in losses["local"]] == [1, 2, 3]
    assert losses["s3"] == losses["local"]
    tars = {cache_name(f"{s3_set}/{p.name}") for p in tiny_data["mm"].glob("train-*.tar")}
    fetched = {p.name for p in cache.iterdir()}
    assert cache_name(f"{s3_set}/train-000000.tar") in fetched and fetched <= tars  # the doctor's probe, then reads


def test_the_shard_fetch_knobs_may_change_on_resume(tmp_path: Path) -> None:
    def recipe(**loader):
        return recipe_from_dict({"name": "r", "stages": [{"name": "a", "data": ["s3://b/set"], "loader": loader}]})

    folder = tmp_path / "stage0-a-step0000002"
    folder.mkdir()
    mark_complete(folder, {"stage_index": 0, "stage": "a", "step": 2, "world_size": 1}, recipe().to_dict(), None, {})
    now = recipe(shard_cache="/cache", shard_retries=2, shard_backoff=0.5, shard_timeout=5.0)
    assert check_resume(folder, now, allow=False) == [
        "recipe change that does not alter training: stages.0.loader.shard_cache: null → /cache",
        "recipe change that does not alter training: stages.0.loader.shard_retries: 5 → 2",
        "recipe change that does not alter training: stages.0.loader.shard_backoff: 1.0 → 0.5",
        "recipe change that does not alter training: stages.0.loader.shard_timeout: 60.0 → 5.0"]
