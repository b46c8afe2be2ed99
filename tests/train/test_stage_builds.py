"""Two stage models built and trained one after another in one process under ZeRO-3 (the path transformers 5's
kernel-decorated attention classes broke on every rank but 0), and the guard around the partitioned build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain.launching import run_ranks

from stage_builds_probe import FAMILIES

PROBE = str(Path(__file__).with_name("stage_builds_probe.py"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("stage-builds")
    result = run_ranks(2, ["--out", str(out)], log=out / "probe.log", timeout=600, module=PROBE)
    assert result.returncode == 0, (out / "probe.log").read_text()[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_second_stage_model_trains_on_every_rank(ranks, family) -> None:
    rank0, rank1 = ranks[0][family], ranks[1][family]
    assert rank0["imported_before_first_build"] is True  # rank 0 built the starting weights plainly first
    assert rank1["imported_before_first_build"] is False  # rank 1's first need of the classes is the partitioned build
    assert rank0["first"] == rank1["first"] and rank0["second"] == rank1["second"]  # one batch, one model
    assert len(rank0["first"]) == len(rank0["second"]) == 3
    assert rank0["first"][2] < rank0["first"][0]
    assert rank0["second"][0] == pytest.approx(rank0["first"][2], abs=1e-6)  # LoRA starts at B = 0: the same model
    # every attention module carries the same instance state on both ranks and in both stages
    assert rank0["attention_attributes"] == rank1["attention_attributes"]
    first, second = rank1["attention_attributes"]
    assert first == second and all(attrs == first[0] for attrs in first)


def test_a_decorated_class_defined_inside_the_partitioned_build_is_refused_by_name(ranks) -> None:
    for rank in ranks:
        assert rank["guard"]["plain"] == "built"
        assert rank["guard"]["decorated"].startswith("__main__.guard_outcomes.<locals>.DefinedInside: first "
                                                     "defined while deepspeed.zero.Init was active")
