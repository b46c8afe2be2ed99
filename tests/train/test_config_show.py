"""`mmtrain config show`: every field of the resolved recipe with its value and source, as a table or JSON."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import yaml

from mmtrain.cli import main
from mmtrain.config import DeprecatedName

REPO = Path(__file__).resolve().parents[2]
OWL = str(REPO / "launch" / "recipes" / "owl-7b.yaml")


def show(capsys, *args: str) -> list[str]:
    assert main(["config", "show", *args]) == 0
    return capsys.readouterr().out.splitlines()


def row(lines: list[str], path: str, value: str, source: str) -> str:
    """The exact line the table prints for a field, its columns where the header puts them."""
    header = lines[0]
    value_at, source_at = header.index("value"), header.index("source")
    return f"{path:<{value_at}}{value:<{source_at - value_at}}{source}"


def test_show_gives_value_and_source_of_every_field(capsys) -> None:
    lines = show(capsys, OWL, "--set", "seed=7", "--set", "stages.0.optimizer.grad_clip=0.5")
    assert lines[0].split() == ["field", "value", "source"]
    assert row(lines, "stages.1.lora.r", "8", "recipe") in lines  # stated in stage 1
    assert row(lines, "stages.0.lora.r", "8", "default") in lines
    assert row(lines, "stages.1.optimizer.lr", "2e-05", "recipe") in lines
    assert row(lines, "stages.1.optimizer.betas", "[0.9, 0.98]", "recipe (stage 0)") in lines  # inherited
    assert row(lines, "stages.1.loader.num_workers", "8", "recipe (stage 0)") in lines
    assert row(lines, "seed", "7", "--set") in lines
    assert row(lines, "stages.0.optimizer.grad_clip", "0.5", "--set") in lines
    assert row(lines, "stages.1.optimizer.grad_clip", "0.5", "--set (stage 0)") in lines
    assert row(lines, "faults.on_bad_sample", "skip", "default") in lines
    assert row(lines, "image.size", "null", "default") in lines
    paths = [line.split()[0] for line in lines[1:]]
    assert len(paths) == len(set(paths)) == 32 + 44 + 46  # every field once: recipe-wide, stage 0, stage 1 (2 sources)
    assert paths.index("faults.keep_last") < paths.index("stages.0.name")  # recipe-wide fields first


def test_show_json_is_the_same_rows(capsys) -> None:
    table = show(capsys, OWL, "--set", "stages.1.optimizer.lr=3e-5")
    data = json.loads("\n".join(show(capsys, OWL, "--set", "stages.1.optimizer.lr=3e-5", "--json")))
    assert data["overrides"] == ["stages.1.optimizer.lr=3e-5"]
    assert data["fields"]["stages.1.optimizer.lr"] == {"value": 3e-5, "source": "--set"}
    assert data["fields"]["stages.1.optimizer.betas"] == {"value": [0.9, 0.98], "source": "recipe (stage 0)"}
    assert data["fields"]["model.config"] == {"value": {}, "source": "default"}
    assert list(data["fields"]) == [line.split()[0] for line in table[1:]]


def test_show_follows_old_names_to_their_new_place(capsys, tmp_path: Path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"name": "old", "stages": [
        {"name": "a", "data": ["/shards"], "loader": {"on_error": "raise", "max_length": 64}},
        {"name": "b", "data": [{"shards": "/other", "weight": 2}]}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecatedName)
        lines = show(capsys, str(recipe))
    assert row(lines, "faults.on_bad_sample", "raise", "recipe (stage 0)") in lines
    assert row(lines, "stages.1.max_length", "64", "recipe (stage 0)") in lines
    assert row(lines, "stages.0.data.0.shards", "/shards", "recipe") in lines
    assert row(lines, "stages.1.data.0.weight", "2.0", "recipe") in lines


def test_show_names_the_file_and_path_of_a_bad_value(capsys) -> None:
    assert main(["config", "show", OWL, "--set", "stages.1.optimizer.lr=abc"]) == 2
    assert capsys.readouterr().err == (f"mmtrain config: error: {OWL}: stages.1.optimizer.lr: expected a number, "
                                       "got 'abc'\n")
