"""Two real ranks (gloo, ZeRO-3) run both stages: what trains, what stays, loss, export, unlike batches per rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.config import load_recipe
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.launching import run_ranks
from mmtrain.model import VisionLanguageModel
from mmtrain.train.checkpoint import list_complete
from mmtrain.train.stage_model import initial_state, model_config

from train_helpers import metrics, stage, write_recipe

PROBES = str(Path(__file__).with_name("probes.py"))


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("two-stages")
    recipe = write_recipe(root / "recipe.yaml", tiny_data, [
        stage("pretrain", tiny_data, train={"vision": True, "connector": True, "llm": "frozen"},
              optimizer={"lr": 3e-3}, steps=6, save_every=3),
        stage("instruct", tiny_data, train={"vision": False, "connector": False, "llm": "lora"},
              lora={"roles": ["self_attn", "ffn"], "r": 4, "alpha": 8}, optimizer={"lr": 3e-3}, steps=4,
              data=[{"shards": str(tiny_data["mm"]), "weight": 0.7}, {"shards": str(tiny_data["text"]), "weight": 0.3}]),
    ])
    run = root / "run"
    result = run_ranks(2, ["--recipe", str(recipe), "--out", str(run)], log=root / "train.log", timeout=600,
                       launcher="deepspeed")  # the launcher users run (launch/train.sh); others use torchrun
    assert result.returncode == 0, (root / "train.log").read_text()[-3000:]
    return recipe, run


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> tuple[set[str], set[str]]:
    names = {k for k in a if k.startswith(prefix)}
    changed = {k for k in names if not torch.equal(a[k], b[k])}
    return changed, names - changed


def test_stage1_trains_vision_and_connector_only_and_loss_falls(two_stage_run) -> None:
    recipe_path, run = two_stage_run
    recipe = load_recipe(recipe_path)
    config = model_config(recipe, load_tokenizer(recipe.tokenizer))
    init = initial_state(recipe, config)  # the seeded starting weights, rebuilt in this process
    after = _weights(run / "stages" / "pretrain")
    assert set(init) == set(after)
    llm_changed, _ = _changed(init, after, "llm.")
    assert llm_changed == set()
    connector_changed, connector_same = _changed(init, after, "connector.")
    assert connector_same == set(), connector_same
    model = VisionLanguageModel.from_config(config)
    unused = {f"vision.{n}" for n in model.vision.unused_parameter_names()}
    vision_changed, vision_same = _changed(init, after, "vision.")
    assert vision_same == unused and vision_changed
    losses = [m["loss"] for m in metrics(run) if m["stage"] == "pretrain"]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_stage2_changes_only_lora_and_hands_off_automatically(two_stage_run) -> None:
    _, run = two_stage_run
    pretrain, instruct = _weights(run / "stages" / "pretrain"), _weights(run / "stages" / "instruct")
    changed = {k for k in pretrain if not torch.equal(pretrain[k], instruct[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(k.startswith("llm.model.layers.") and k.split(".")[-2] in targets for k in changed)
    assert len(changed) == 2 * 7  # every LoRA-adapted LLM linear of both layers moved, nothing else
    events = [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["trainable"]["vision"], e["trainable"]["connector"] > 0, e["trainable"]["llm"] > 0)
            for e in events] == [("pretrain", events[0]["trainable"]["vision"], True, False),
                                 ("instruct", 0, False, True)]
    tags = [ref.tag for ref in list_complete(run / "checkpoints")]
    # save_every: 3 is inherited by stage 2, which does not restate it
    assert tags == ["stage0-pretrain-step0000003", "stage0-pretrain-step0000006", "stage1-instruct-step0000003",
                    "stage1-instruct-step0000004"]


def test_export_matches_the_engine_and_loads_in_mmtrain_transformers_and_peft(two_stage_run, tmp_path: Path) -> None:
    recipe, run = two_stage_run
    checkpoint = run / "checkpoints" / "stage1-instruct-step0000004"
    dump = tmp_path / "engine.safetensors"
    probe = run_ranks(2, ["engine_logits", "--recipe", str(recipe), "--out", str(run), "--dump", str(dump)],
                      log=tmp_path / "probe.log", timeout=300, module=PROBES)
    assert probe.returncode == 0, (tmp_path / "probe.log").read_text()[-3000:]
    for merge in (False, True):
        out = tmp_path / ("merged" if merge else "adapter")
        cmd = [sys.executable, "-m", "mmtrain", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
        subprocess.run(cmd + (["--merge-lora"] if merge else []), check=True, capture_output=True)
    # A fresh process with no DeepSpeed: exported logits == the engine's on the same batch.
    script = f"""
import sys, torch
from safetensors.torch import load_file
from mmtrain.model import VisionLanguageModel
from peft import PeftModel
from transformers import AutoModelForCausalLM
dump = load_file({str(dump)!r})
inputs = {{k: v for k, v in dump.items() if k != "logits"}}
merged = VisionLanguageModel.from_pretrained({str(tmp_path / 'merged')!r}).eval()
base = VisionLanguageModel.from_pretrained({str(tmp_path / 'adapter')!r}).eval()
peft_model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter' / 'adapter')!r}).eval()
llm = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged' / 'llm')!r}).eval()
hf = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}, trust_remote_code=True).eval()
with torch.no_grad():
    a = merged(**inputs).logits
    d = (hf(**inputs).logits - dump["logits"]).abs().max().item()
    b = peft_model.base_model.model(**inputs).logits
    ids = inputs["input_ids"].clamp(max=llm.config.vocab_size - 1)
    c = (llm(input_ids=ids).logits - merged.llm(input_ids=ids).logits).abs().max().item()
print((a - dump["logits"]).abs().max().item(), (b - dump["logits"]).abs().max().item(), c,
      "deepspeed" in sys.modules, d, type(hf).__module__.startswith("transformers_modules"))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    merged_err, peft_err, llm_err, deepspeed_loaded = float(out[0]), float(out[1]), float(out[2]), out[3]
    assert merged_err < 1e-5 and peft_err < 1e-5 and llm_err == 0.0
    assert float(out[4]) < 1e-5 and out[5] == "True"  # transformers alone, the modeling code from the export
    assert deepspeed_loaded == "False"
    adapter_config = json.loads((tmp_path / "adapter" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8


def test_ranks_with_only_text_and_only_images_do_not_hang(tiny_data, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, [
        stage("pretrain", tiny_data, train={"vision": True, "connector": True, "llm": "full"},
              data=[{"shards": str(tiny_data["mm"]), "weight": 1.0}, {"shards": str(tiny_data["text"]), "weight": 1.0}]),
    ])
    result = run_ranks(2, ["unlike_batches", "--recipe", str(recipe), "--out", str(tmp_path)],
                       log=tmp_path / "probe.log", timeout=300, module=PROBES)
    assert result.returncode == 0, (tmp_path / "probe.log").read_text()[-3000:]
    rank0 = json.loads((tmp_path / "rank-0.json").read_text())
    rank1 = json.loads((tmp_path / "rank-1.json").read_text())
    assert [r["images"] for r in rank0] == [0, 0, 0] and all(r["images"] == 4 for r in rank1)
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rank0 + rank1)  # finite, no NaN
