"""`mmtrain doctor` on a tiny recipe: the good recipe passes; each planted misconfiguration fails its own row."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


from doctor_helpers import REPO, tiny_recipe
from mmtrain.cli import main
from mmtrain.config import load_recipe, recipe_from_dict
from mmtrain.doctor import Check, failures, format_table, run_checks
from mmtrain.model import preset_config

ROWS = ["shards", "shard count", "tokenizer", "vocabulary", "sequence length", "model paths", "stages",
        "deepspeed config", "deepspeed", "attention", "versions", "device & backend", "disk space"]
GOOD_WARNS: set[str] = set()  # tiny-cpu (17 slots per image) fits max_length on the tiny shards: nothing to warn
"""The tiny recipe's only WARN: a few probed samples are longer than max_length 192 and get truncated."""


def checks_of(raw: dict, tmp_path: Path, world_size: int = 2) -> dict[str, Check]:
    checks = run_checks(recipe_from_dict(raw), world_size, out=tmp_path / "run", device_type="cpu")
    assert [c.name for c in checks] == ROWS
    return {c.name: c for c in checks}


def only_failure(checks: dict[str, Check]) -> Check:
    failed = failures(list(checks.values()))
    assert len(failed) == 1, format_table(list(checks.values()))
    return failed[0]


def test_good_tiny_recipe_passes(doctor_data, tmp_path):
    checks = checks_of(tiny_recipe(doctor_data), tmp_path)
    table = format_table(list(checks.values()))
    assert not failures(list(checks.values())), table
    assert {n for n, c in checks.items() if c.status == "WARN"} == GOOD_WARNS, table
    assert checks["sequence length"].detail.startswith("17 slots per image;")
    assert "pretrain 57/192" in checks["sequence length"].detail
    assert "8 train shard(s)" in checks["shards"].detail and "ZeRO-3 batch 16" in checks["deepspeed config"].detail


def test_too_few_shards_for_ranks_times_workers_warns(doctor_data, tmp_path):
    checks = checks_of(tiny_recipe(doctor_data), tmp_path, world_size=8)
    assert checks["shard count"].status == "WARN"
    detail = checks["shard count"].detail
    assert f"stage 'pretrain' {doctor_data['mm']} has 4 shards for 8 slots" in detail
    assert "with replacement" in detail  # tiny-cpu's stages read in resampled mode
    assert not failures(list(checks.values()))


def test_a_missing_manifest_or_shard_fails_the_shards_row(doctor_data, tmp_path):
    broken = tmp_path / "mm-copy"
    shutil.copytree(doctor_data["mm"], broken)
    (broken / "train-000001.tar").unlink()
    raw = tiny_recipe(doctor_data)
    raw["stages"][1]["data"] = [{"shards": str(broken)}]
    failed = only_failure(checks_of(raw, tmp_path))
    assert failed.name == "shards" and "stage 'pretrain'" in failed.detail
    assert "train-000001.tar is missing" in failed.detail
    (broken / "manifest.json").unlink()
    failed = only_failure(checks_of(raw, tmp_path))
    assert failed.name == "shards" and f"{broken}/manifest.json: no manifest.json" in failed.detail


def test_a_tokenizer_without_the_image_token_fails_the_tokenizer_row(doctor_data, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in (REPO / "README.md").read_text().split() for w in [text]})[:500]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<unk>", "<s>", "</s>", "<pad>", *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tok-no-image"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(folder))
    raw = {**tiny_recipe(doctor_data), "tokenizer": str(folder)}
    failed = only_failure(checks_of(raw, tmp_path))
    assert failed.name == "tokenizer" and f"{folder} lacks the image token <image>" in failed.detail


def test_a_deepspeed_micro_batch_disagreeing_with_the_recipe_fails(doctor_data, tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    path = tmp_path / "ds-mb2.json"
    path.write_text(json.dumps(config))
    raw = tiny_recipe(doctor_data)
    raw["stages"][2]["deepspeed"] = str(path)
    failed = only_failure(checks_of(raw, tmp_path))
    assert failed.name == "deepspeed config"
    assert "stage 'instruct'" in failed.detail and str(path) in failed.detail
    assert "train_micro_batch_size_per_gpu is 2 but the recipe gives 16" in failed.detail  # instruct inherits pretrain's 16


def test_flex_training_on_cpu_and_compile_under_zero3_fail_the_attention_row(doctor_data, tmp_path):
    raw = {**tiny_recipe(doctor_data), "attention": "flex", "compile": True}
    failed = only_failure(checks_of(raw, tmp_path))
    assert failed.name == "attention"
    assert "backward only on CUDA" in failed.detail
    assert failed.detail.count("compile: true needs ZeRO stage 0-2") == 3  # all three tiny-cpu stages are ZeRO-3
    assert checks_of(tiny_recipe(doctor_data), tmp_path)["attention"].detail == "auto → sdpa on cpu, eager"


def _part_dirs(tmp_path: Path, llm_hidden: int) -> tuple[Path, Path]:
    from transformers import CLIPVisionConfig, LlamaConfig

    config = preset_config("tiny")
    strip = lambda d: {k: v for k, v in d.items() if k != "model_type"}  # noqa: E731
    vision, llm = tmp_path / "vision", tmp_path / "llm"
    CLIPVisionConfig(**strip(config.vision_config)).save_pretrained(vision)
    LlamaConfig(**{**strip(config.text_config), "hidden_size": llm_hidden}).save_pretrained(llm)
    return vision, llm


def test_part_dirs_describe_the_model_and_a_missing_one_fails_the_model_paths_row(doctor_data, tmp_path):
    vision, llm = _part_dirs(tmp_path, llm_hidden=256)
    raw = tiny_recipe(doctor_data)
    raw["model"] = {"preset": "tiny", "vision_path": str(vision), "llm_path": str(llm)}
    checks = checks_of(raw, tmp_path)
    assert checks["model paths"].status == "WARN"
    assert checks["model paths"].detail == (f"model.llm_path {llm}/config.json: hidden_size 256 (published: 128): not "
                                            "preset 'tiny''s published part (the checkpoint's own config is used)")
    assert not failures(list(checks.values()))
    raw["model"]["llm_path"] = str(tmp_path / "nowhere")
    checks = checks_of(raw, tmp_path)
    assert checks["model paths"].detail == f"model.llm_path {tmp_path / 'nowhere'} does not exist"
    assert [c.name for c in failures(list(checks.values()))] == ["vocabulary", "model paths"]  # no model config


def test_without_a_preset_the_model_needs_a_connector_and_both_parts(doctor_data, tmp_path):
    vision, llm = _part_dirs(tmp_path, llm_hidden=128)
    raw = tiny_recipe(doctor_data)
    raw["model"] = {"vision_path": str(vision)}
    checks = checks_of(raw, tmp_path)
    assert [c.name for c in failures(list(checks.values()))] == ["vocabulary", "model paths"]
    assert checks["model paths"].detail == (
        "model.llm_path is unset: pretrained parts load only with both vision_path and llm_path (or start from "
        "model.init); model.connector is unset: without a preset, name the connector")


def test_matching_part_dirs_pass(doctor_data, tmp_path):
    vision, llm = _part_dirs(tmp_path, llm_hidden=128)
    raw = tiny_recipe(doctor_data)
    raw["model"] = {"preset": "tiny", "vision_path": str(vision), "llm_path": str(llm)}
    checks = checks_of(raw, tmp_path)
    assert checks["model paths"].status == "PASS" and "fixed by model.llm_path" in checks["vocabulary"].detail
    assert checks["model paths"].detail == (f"clip_vision_model from {vision}; llama from {llm}; no "
                                            "preprocessor_config.json: CLIP's image mean/std unless the recipe's "
                                            "image sets them")
    assert not failures(list(checks.values()))


def test_max_length_too_small_for_the_slots_fails_the_sequence_length_row(doctor_data, tmp_path, write_recipe):
    recipe = load_recipe(write_recipe(tiny_recipe(doctor_data)), ["stages.1.max_length=48"])
    checks = {c.name: c for c in run_checks(recipe, 2, tmp_path, "cpu")}
    failed = only_failure(checks)
    assert failed.name == "sequence length"
    assert "stage 'pretrain', stage 'instruct': max_length 48 <" in failed.detail and "1 × 17 slots" in failed.detail
    assert "stage 'lm'" not in failed.detail.split("every such")[0]


def test_cli_exit_codes_and_table(doctor_data, tmp_path, write_recipe, capsys):
    good = write_recipe(tiny_recipe(doctor_data))
    assert main(["doctor", "--recipe", str(good), "--world-size", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recipe            PASS" in out and "0 fail: ready to train" in out
    assert main(["doctor", "--recipe", str(good), "--set", "stages.0.micro_batch=0"]) == 2
    out = capsys.readouterr().out
    assert "recipe  FAIL" in out and "micro_batch" in out


def test_cli_in_a_process_exits_2_on_a_fail(doctor_data, tmp_path, write_recipe):
    raw = tiny_recipe(doctor_data)
    raw["stages"][0]["deepspeed"] = str(tmp_path / "missing.json")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.cli", "doctor", "--recipe", str(write_recipe(raw)),
                           "--world-size", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("deepspeed config"))
    assert "FAIL" in line and "missing.json" in line and "stage 'lm'" in line


def test_the_shipped_tiny_cpu_recipe_passes_with_its_paths_set(doctor_data, tmp_path, capsys):
    mm, text, tok = doctor_data["mm"], doctor_data["text"], doctor_data["tokenizer"]
    sets = [f"tokenizer={tok}", f"stages.0.data.0.shards={text}", f"stages.0.data.1.shards={text}",
            f"stages.1.data.0.shards={mm}",
            f"stages.2.data.0.shards={mm}", f"stages.2.data.1.shards={mm}", f"stages.2.data.2.shards={text}"]
    args = ["doctor", "--recipe", str(REPO / "launch" / "recipes" / "tiny-cpu.yaml"), "--world-size", "2",
            "--out", str(tmp_path), "--device", "cpu"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    statuses = {line[:18].strip(): line[18:24].strip() for line in out.splitlines()[2:-1]}
    assert {n for n, s in statuses.items() if s == "WARN"} == GOOD_WARNS, out
