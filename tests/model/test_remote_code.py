"""An exported directory is a transformers model on its own: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`, `AutoTokenizer` and `AutoImageProcessor` load it in a Python where mmtrain cannot be
imported, and it computes our logits, loss and generations on the same inputs.

One subprocess loads all three connectors' exports (starting Python with torch and transformers is most of its cost).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import get_imports, get_relative_import_files, get_relative_imports
from vlm_helpers import make_batch, set_gates

from mmtrain.data.loader.images import CLIP_MEAN, CLIP_STD, ImageConfig, preprocess, processor_settings
from mmtrain.data.loader.tokenizer import train_tokenizer
from mmtrain.model.config import VLMConfig
from mmtrain.model.presets import tiny_config
from mmtrain.model.remote_code import (MODELING_FILE, BundleError, flatten_imports, write_image_processor,
                                       write_remote_code)
from mmtrain.model.remote_code.modeling import image_slots_from_placeholders
from mmtrain.model.vlm import VisionLanguageModel

CONNECTORS = ("abstractor", "xattn", "layerwise")
TEXT = "a red shirt <image> with white stripes"
IMAGE_CONFIG = {"size": 32, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resize": "shortest", "augment": False,
                "hflip": False}

CHILD = r'''
import importlib.abc
import sys


class NoMmtrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmtrain" or name.startswith("mmtrain."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None


sys.meta_path.insert(0, NoMmtrain())
try:
    import mmtrain  # noqa: F401
    blocked = False
except ModuleNotFoundError:
    blocked = True

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
inputs = torch.load(sys.argv[1])
out = {"blocked": blocked}
for name, case in inputs["cases"].items():
    model, info = AutoModelForCausalLM.from_pretrained(case["dir"], trust_remote_code=True, output_loading_info=True)
    batch = case["batch"]
    with torch.no_grad():
        result = model(**batch)
        try:
            derived = model(**{k: v for k, v in batch.items() if k != "image_slots"}).logits
        except ValueError as error:
            derived = str(error)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    processor = AutoImageProcessor.from_pretrained(case["dir"])
    out[name] = {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "info": {k: sorted(map(str, v)) for k, v in info.items()},
        "logits": result.logits, "loss": result.loss, "derived": derived,
        "tokens": model.generate(**case["generate"], max_new_tokens=4),
        "tied": head.data_ptr() == embed.data_ptr(), "head_equals_embed": bool(torch.equal(head, embed)),
        "token_ids": AutoTokenizer.from_pretrained(case["dir"])(inputs["text"]).input_ids,
        "pixels": processor(images=Image.open(inputs["image"]), return_tensors="pt").pixel_values,
    }
out["mmtrain_modules"] = sorted(m for m in sys.modules if m == "mmtrain" or m.startswith("mmtrain."))
torch.save(out, sys.argv[2])
'''


def _model(connector: str) -> VisionLanguageModel:
    """A tiny model with every path live: xattn / layerwise gates open, and (abstractor) tied embeddings, which our
    safetensors stores once."""
    config = tiny_config(connector)
    config.text_config["tie_word_embeddings"] = connector == "abstractor"
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config).eval()
    set_gates(model, 0.5)
    return model


def _export(model: VisionLanguageModel, out: Path, tokenizer: Path) -> None:
    """What `mmtrain export` writes for transformers: our weights and config, the modeling files, the tokenizer and
    the image processor."""
    model.save_pretrained(out)
    write_remote_code(out, model.config)
    for item in tokenizer.iterdir():
        shutil.copy2(item, out / item.name)
    write_image_processor(out, IMAGE_CONFIG)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three exports, our outputs on fixed inputs, and theirs from one subprocess that cannot import mmtrain."""
    tmp = tmp_path_factory.mktemp("remote_code")
    tokenizer = train_tokenizer([f"a red shirt with white stripes, size {i}" for i in range(40)], 320, tmp / "tok")
    image = tmp / "image.png"
    # 96 x 64 scales to 48 x 32 exactly: mmtrain rounds the long side, transformers truncates it (1 px apart otherwise)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    ours, cases = {}, {}
    for connector in CONNECTORS:
        model = _model(connector)
        batch = make_batch(model, images_per_sample=(2, 1))
        _export(model, tmp / connector, tokenizer)
        first = int((batch["image_slots"][:, 0] == 0).sum())  # sample 0 is the longest row: no padding
        generate = {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1],
                    "pixel_values": batch["pixel_values"][:first], "image_slots": batch["image_slots"][:first]}
        with torch.no_grad():
            result = model(**batch)
            blank = model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}).logits
            reloaded = VisionLanguageModel.from_pretrained(tmp / connector).eval()(**batch).logits
        ours[connector] = {"model": model, "logits": result.logits, "loss": result.loss, "blank": blank,
                           "reloaded": reloaded, "tokens": model.generate(**generate, max_new_tokens=4)}
        cases[connector] = {"dir": str(tmp / connector), "batch": batch, "generate": generate}
    torch.save({"cases": cases, "text": TEXT, "image": str(image)}, tmp / "inputs.pt")
    (tmp / "child.py").write_text(CHILD)
    cwd = tmp / "elsewhere"  # not the repository: nothing of mmtrain on sys.path[0]
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, str(tmp / "child.py"), str(tmp / "inputs.pt"), str(tmp / "outputs.pt")],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    theirs = torch.load(tmp / "outputs.pt")
    mine = {"tokenizer": tokenizer, "image": image, "tmp": tmp}
    return ours, theirs, mine


@pytest.mark.parametrize("connector", CONNECTORS)
def test_export_loads_without_mmtrain_and_computes_our_logits(exported, connector):
    ours, theirs, _ = exported
    mine, got = ours[connector], theirs[connector]
    assert theirs["blocked"] and theirs["mmtrain_modules"] == []
    assert got["class"].startswith("transformers_modules.") and got["class"].endswith(".MMTrainVLMForCausalLM")
    assert got["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    tied = connector == "abstractor"
    assert got["tied"] is tied and got["head_equals_embed"] is tied
    assert not torch.allclose(mine["logits"], mine["blank"], atol=1e-3)  # the images reach the logits
    torch.testing.assert_close(got["logits"], mine["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["loss"], mine["loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mine["reloaded"], mine["logits"], atol=0, rtol=0)  # our loader reads the same dir
    assert torch.equal(got["tokens"], mine["tokens"])
    if connector == "layerwise":  # no placeholders to find the images by
        assert "pass image_slots" in got["derived"]
    else:
        torch.testing.assert_close(got["derived"], mine["logits"], atol=1e-4, rtol=0)


def test_export_tokenizer_and_image_processor_reproduce_the_trainers(exported):
    _, theirs, mine = exported
    expected_ids = AutoTokenizer.from_pretrained(mine["tokenizer"])(TEXT).input_ids
    expected_pixels = preprocess(mine["image"].read_bytes(), ImageConfig(**{**IMAGE_CONFIG, "mean": CLIP_MEAN,
                                                                           "std": CLIP_STD}))
    for connector in CONNECTORS:
        assert theirs[connector]["token_ids"] == expected_ids
        torch.testing.assert_close(theirs[connector]["pixels"][0], expected_pixels, atol=1e-5, rtol=0)


def test_bundle_is_exactly_what_transformers_copies(exported):
    """The files written are the modeling file's relative-import closure as transformers computes it, no more; they
    import no mmtrain and no peft; and config.json still reads as our VLMConfig."""
    ours, _, mine = exported
    out = mine["tmp"] / "abstractor"
    written = {p.name for p in out.glob("*.py")}
    entry = out / f"{MODELING_FILE}.py"
    others = written - {entry.name}
    assert {Path(f).name for f in get_relative_import_files(str(entry))} == others  # 5.x: imports of imports
    assert {f"{m}.py" for m in get_relative_imports(str(entry))} == others  # 4.x, local directory: direct imports
    assert {"mmtrain_model_vlm.py", "mmtrain_model_connectors_xattn.py", "mmtrain_errors.py"} <= written
    assert "mmtrain_model_lora.py" not in written
    for name in written:
        assert not {"mmtrain", "peft", "deepspeed"} & set(get_imports(str(out / name))), name
    assert VLMConfig.from_pretrained(out) == ours["abstractor"]["model"].config


def test_image_slots_from_placeholders():
    ids = torch.tensor([[5, 9, 9, 9, 9, 6, 9, 9],
                        [0, 0, 7, 9, 9, 8, 8, 8]])  # row 0: two images back to back, then one; row 1 left-padded
    assert image_slots_from_placeholders(ids, 9, 2).tolist() == [[0, 1], [0, 3], [0, 6], [1, 3]]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        image_slots_from_placeholders(ids, 9, 3)
    with pytest.raises(ValueError, match="runs of 2"):
        image_slots_from_placeholders(torch.tensor([[9, 1, 9, 2]]), 9, 2)
    with pytest.raises(ValueError, match="pass image_slots"):
        image_slots_from_placeholders(ids, 9, 0)


def test_flatten_imports_rewrites_only_mmtrain_imports_in_place():
    source = ('"""doc"""\nfrom __future__ import annotations\nimport torch\n'
              'from mmtrain.model.llm import (decoder_layers,\n    self_attention as attn)  # why\n'
              'def f():\n    from mmtrain.errors import UserError  # lazy\n    return UserError\n')
    flat, imported = flatten_imports("mmtrain.model.example", source)
    assert imported == ["mmtrain.errors", "mmtrain.model.llm"]
    assert flat.splitlines()[1:] == [
        '"""doc"""', "from __future__ import annotations", "import torch",
        "from .mmtrain_model_llm import decoder_layers, self_attention as attn  # why",
        "def f():", "    from .mmtrain_errors import UserError  # lazy", "    return UserError"]
    assert flat.startswith("# Copied from mmtrain/model/example.py")


@pytest.mark.parametrize("source, problem", [
    ("from mmtrain.model.connectors import abstractor", "imports module mmtrain.model.connectors.abstractor"),
    ("import mmtrain.model.vlm", "cannot be flattened"),
    ("from .vlm import VisionLanguageModel", "relative import"),
    ("from mmtrain.model.nowhere import X", "not a module"),
    ("import os; from mmtrain.errors import UserError", "must start its line"),
])
def test_bundler_refuses_imports_the_flat_copy_cannot_express(source, problem):
    with pytest.raises(BundleError, match=problem):
        flatten_imports("mmtrain.example", source)


@pytest.mark.parametrize("resize", ["shortest", "pad"])
def test_image_processor_reads_back_as_the_trainers_settings(tmp_path, resize):
    write_image_processor(tmp_path, {**IMAGE_CONFIG, "resize": resize})
    expected = {"size": 32, "mean": tuple(CLIP_MEAN), "std": tuple(CLIP_STD)}
    assert processor_settings(tmp_path) == ({**expected, "resize": "pad"} if resize == "pad" else expected)


def test_mmtrain_reads_an_exports_tokenizer_without_asking_to_run_its_code(exported):
    """An export names its modeling code in config.json. mmtrain's tokenizer loader (eval, generate, chat) never runs
    it, so transformers never stops to ask on the terminal (it does when trust_remote_code is left unset): a fresh
    process with an open, silent stdin reads the tokenizer at once."""
    _, _, mine = exported
    script = ("import sys; from mmtrain.data.loader.tokenizer import load_tokenizer; "
              f"print(load_tokenizer(sys.argv[1])({TEXT!r}).input_ids)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(mine["tmp"] / "xattn")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)  # stdin stays open: a prompt would wait for an answer
    finally:
        proc.kill()
    assert "custom code" not in out, out
    assert out.strip().splitlines()[-1] == str(AutoTokenizer.from_pretrained(mine["tokenizer"])(TEXT).input_ids)
