"""Recipe builders shared by the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "preset": "tiny",
    "config": {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2},
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "connector_config": {"num_queries": 8, "num_layers": 1, "hidden_size": 64, "num_heads": 4,
                             "intermediate_size": 128},
    },
}


def write_recipe(path: Path, data: dict[str, Path], stages: list[dict], **extra) -> Path:
    recipe = {"name": "test", "seed": 0, "tokenizer": str(data["tokenizer"]), "template": "owl",
              "model": TINY_MODEL, "stages": stages, **extra}
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe, default=str))), encoding="utf-8")
    return path


def stage(name: str, paths: dict[str, Path], **fields) -> dict:
    base = {"name": name, "data": [{"shards": str(paths["mm"]), "weight": 1.0}], "micro_batch": 4, "steps": 4,
            "max_length": 192, "deepspeed": str(REPO / "ds_configs" / "zero3.json"),
            "loader": {"num_workers": 0, "mode": "resampled", "samples_per_epoch": 4000, "shuffle_buffer": 50}}
    base.update(fields)
    return base


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
