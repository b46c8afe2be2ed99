"""Starting weights with a tensor the model has no place for stop a 2-rank ZeRO-3 run before step 1, on every rank
(no rank waits at a collective), naming the tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmtrain.config import load_recipe
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.launching import run_ranks
from mmtrain.model import VisionLanguageModel
from mmtrain.train.stage_model import model_config
from train_helpers import TINY_MODEL, stage, write_recipe


def test_an_extra_tensor_in_the_starting_weights_stops_every_rank_naming_it(tiny_data, tmp_path: Path) -> None:
    plain = write_recipe(tmp_path / "plain.yaml", tiny_data, [stage("s", tiny_data)])
    config = model_config(load_recipe(plain), load_tokenizer(tiny_data["tokenizer"]))
    start = tmp_path / "start"
    VisionLanguageModel.from_config(config).save_pretrained(start)
    weights = start / "model.safetensors"
    save_file({**load_file(str(weights)), "llm.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(weights),
              metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [stage("s", tiny_data)],
                          model={**TINY_MODEL, "init": str(start)})
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(tmp_path / "run")], log=tmp_path / "run.log",
                       timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert result.returncode != 0
    assert (f"{start}: not every weight is accounted for: 1 checkpoint tensor(s) with no place in the "
            "model: llm.model.layers.0.self_attn.q_proj.bias") in log, log[-3000:]
    assert f"{start}: rank 0 refused them (its error names the tensors)" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_connector_with_a_persistent_buffer_loads_on_every_rank(tiny_data, tmp_path: Path) -> None:
    """The abstractor's `center` option keeps a running mean (a persistent buffer): rank 0 reads it from the starting
    weights and every rank joins its broadcast, so the ranks neither diverge nor wait on each other."""
    connector = {**TINY_MODEL["config"]["connector_config"], "center": True}
    model = {**TINY_MODEL, "config": {**TINY_MODEL["config"], "connector_config": connector}}
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [stage("s", tiny_data, steps=1)], model=model,
                          faults={"collective_timeout_s": 60, "hang_timeout_s": 60})
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(tmp_path / "run")], log=tmp_path / "run.log",
                       timeout=300)
    assert result.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    weights = load_file(str(tmp_path / "run" / "stages" / "s" / "model.safetensors"))
    assert "connector.abstractor.running_mean" in weights
