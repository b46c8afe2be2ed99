"""`template: chat`: the tokenizer's own jinja chat_template, answers + end-of-turn learned, everything else masked.

The tokenizers are BPE models trained here on a few lines (no download), each carrying a chat template in its
family's shape, written for these tests: ChatML (Qwen2.5: byte-level, default system prompt), Llama-3 (byte-level,
BOS as text, trimmed content), Gemma (no system role, strict alternation; its turn markers are plain added tokens, not
special) and Mistral (sentencepiece-style `▁` pre-tokenizer; ignores add_generation_prompt; moves the system prompt
into the last user turn, so not prefix-stable).
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AddedToken, PreTrainedTokenizerFast

from mmtrain.cli import main
from mmtrain.config import load_recipe
from mmtrain.config.recipe import TemplateName
from mmtrain.data.loader.chat_template import ChatTemplate, ChatTemplateError
from mmtrain.data.loader.image_token import IMAGE_TOKEN, image_token_id
from mmtrain.data.loader.templates import (IGNORE_INDEX, TEMPLATE_NAMES, Renderer, SampleDropped, get_template,
                                           render_masked)
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.eval.prompts import render_prompt
from mmtrain.errors import UserError

CHATML = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}")
GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}")
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '[INST] ' + (system + '\\n\\n' if loop.index0 == ns.last and system else '') + m['content'] + '[/INST]' -}}"
    "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}")

# name: (chat template, special tokens, bos, eos, pad, plain added tokens); mistral's model is sentencepiece-style
FAMILIES = {
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", []),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|pad|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", []),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<pad>"], "<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>"]),
    "mistral": (MISTRAL, ["<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", []),
    "none": (None, ["<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", []),
}
CORPUS = ["What is this shirt made of? Cotton, blue. Compare it with please. The second one is leather shoes.",
          "You are a helpful assistant. You sell shoes. system user assistant model item number"] * 20

SLOTS = 3
CONV = [
    {"role": "user", "content": "<image>\nWhat is this shirt made of?"},
    {"role": "assistant", "content": "Cotton, blue."},
    {"role": "user", "content": "Compare it with <image> please."},
    {"role": "assistant", "content": "The second one is leather shoes."},
]
IMG = object()
CHATML_SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# The expected rendering, literally, as runs of (text or IMG, learned)
LAYOUT = {
    "chatml": [(CHATML_SYS + "<|im_start|>user\n", False), (IMG, False),
               ("\nWhat is this shirt made of?<|im_end|>\n<|im_start|>assistant\n", False),
               ("Cotton, blue.<|im_end|>", True), ("\n<|im_start|>user\nCompare it with ", False), (IMG, False),
               (" please.<|im_end|>\n<|im_start|>assistant\n", False),
               ("The second one is leather shoes.<|im_end|>", True), ("\n", False)],
    "llama3": [("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", False), (IMG, False),
               ("\nWhat is this shirt made of?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
               ("Cotton, blue.<|eot_id|>", True),
               ("<|start_header_id|>user<|end_header_id|>\n\nCompare it with ", False), (IMG, False),
               (" please.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
               ("The second one is leather shoes.<|eot_id|>", True)],
    "gemma": [("<bos><start_of_turn>user\n", False), (IMG, False),
              ("\nWhat is this shirt made of?<end_of_turn>\n<start_of_turn>model\n", False),
              ("Cotton, blue.<end_of_turn>", True), ("\n<start_of_turn>user\nCompare it with ", False), (IMG, False),
              (" please.<end_of_turn>\n<start_of_turn>model\n", False),
              ("The second one is leather shoes.<end_of_turn>", True), ("\n", False)],
    "mistral": [("<s>[INST] ", False), (IMG, False), ("\nWhat is this shirt made of?[/INST]", False),
                ("Cotton, blue.</s>", True), ("[INST] Compare it with ", False), (IMG, False),
                (" please.[/INST]", False), ("The second one is leather shoes.</s>", True)],
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}


@functools.cache
def tokenizer_dir(family: str, root: str) -> Path:
    """A BPE tokenizer with `<image>` and the family's chat template, saved under `root`."""
    template, specials, bos, eos, pad, plain = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    if family == "mistral":  # sentencepiece-style: spaces become ▁, ▁ prepended to the text's first word
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse()])
        alphabet = sorted(set(string.printable.replace(" ", "\u2581")))
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials + ["<image>"], show_progress=False, initial_alphabet=alphabet))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=[s for s in specials if s not in (bos, eos, pad)]
                                  + ["<image>"], clean_up_tokenization_spaces=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if template is not None:
        tok.chat_template = template
    out = Path(root) / family
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """family → loaded tokenizer (as the trainer loads it)."""
    root = str(tmp_path_factory.mktemp("chat-tokenizers"))
    return {name: load_tokenizer(tokenizer_dir(name, root)) for name in FAMILIES}


def runs(tok, r):
    """The rendering as runs of (decoded text, or IMG for a slot run; learned), consecutive tokens decoded together."""
    out, i, starts = [], 0, set(r.image_starts)
    while i < len(r):
        if i in starts:
            out.append((IMG, False))
            i += r.num_slots
            continue
        learned, j = r.labels[i] != IGNORE_INDEX, i
        while j < len(r) and j not in starts and (r.labels[j] != IGNORE_INDEX) == learned:
            j += 1
        out.append((tok.decode(r.input_ids[i:j]), learned))
        i = j
    return out


def hf_ids(tok, conversation, slots=SLOTS, **kwargs):
    """The tokenizer's own ids for the template's rendering, each <image> token widened to its slot run."""
    text = tok.apply_chat_template(conversation, tokenize=False, **kwargs)
    image = image_token_id(tok)
    return [x for t in tok.encode(text, add_special_tokens=False) for x in ([image] * slots if t == image else [t])]


def spans(labels):
    """[start, end) of each run of learned labels."""
    out = []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            if out and out[-1][1] == i:
                out[-1][1] = i + 1
            else:
                out.append([i, i + 1])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "mistral"])
def test_two_turns_with_images_exact_ids_labels_and_slot_runs(tok, family):
    t = tok[family]
    r = Renderer(t, "chat", SLOTS).render(CONV, num_images=2, key="k")
    hf = hf_ids(t, CONV)
    assert r.input_ids == hf  # exactly the tokenizer's own ids for the template's text
    image = image_token_id(t)
    assert r.image_starts == [i for i, x in enumerate(hf) if x == image and hf[i - 1] != image]
    assert runs(t, r) == LAYOUT[family]
    assert "".join(IMAGE_TOKEN if text is IMG else text for text, _ in LAYOUT[family]) == t.apply_chat_template(
        CONV, tokenize=False)
    learned = [i for i, label in enumerate(r.labels) if label != IGNORE_INDEX]
    assert all(r.labels[i] == r.input_ids[i] for i in learned)
    assert r.num_slots == SLOTS and not r.truncated and len(r.image_starts) == 2
    for s in r.image_starts:
        assert r.input_ids[s:s + SLOTS] == [image_token_id(t)] * SLOTS
        assert r.labels[s:s + SLOTS] == [IGNORE_INDEX] * SLOTS
        assert r.input_ids[s - 1] != image_token_id(t) and r.input_ids[s + SLOTS] != image_token_id(t)
    # per assistant turn: exactly its answer and the end-of-turn token the template emits after it
    end = END_OF_TURN[family]
    assert [t.decode(r.input_ids[a:b]) for a, b in spans(r.labels)] == [
        "Cotton, blue." + end, "The second one is leather shoes." + end]


def test_sentencepiece_style_answers_are_not_prefixed_with_a_space(tok):
    """Encoded on its own, "Cotton" would start with ▁ (a space the template never wrote): whole it does not."""
    t = tok["mistral"]
    r = Renderer(t, "chat", SLOTS).render(CONV)
    first = spans(r.labels)[0][0]
    assert not t.convert_ids_to_tokens(r.input_ids[first]).startswith("\u2581")
    assert t.convert_ids_to_tokens(t.encode("Cotton, blue.", add_special_tokens=False))[0].startswith("\u2581")


def test_bos_comes_from_the_template_once_and_eos_is_not_appended(tok):
    llama, chatml = tok["llama3"], tok["chatml"]
    r = Renderer(llama, "chat", SLOTS).render(CONV)
    assert r.input_ids[0] == llama.bos_token_id and r.input_ids.count(llama.bos_token_id) == 1
    assert llama.eos_token_id not in r.input_ids  # <|end_of_text|>: the template closes turns with <|eot_id|>
    assert chatml.bos_token_id is None and r.input_ids[-1] != llama.eos_token_id
    assert Renderer(chatml, "chat", SLOTS).render(CONV).input_ids[0] == chatml.convert_tokens_to_ids("<|im_start|>")


def test_system_turn_replaces_the_default_and_trimmed_answers_learn_the_rendered_text(tok):
    conv = [{"role": "system", "content": "You sell shoes."}] + CONV[:2]
    r = Renderer(tok["chatml"], "chat", SLOTS).render(conv)
    text = tok["chatml"].decode(r.input_ids)
    assert text.startswith("<|im_start|>system\nYou sell shoes.<|im_end|>\n<|im_start|>user\n")
    assert "helpful" not in text
    # Llama-3 trims content: the learned text is what the template rendered, the leading whitespace masked
    conv = [CONV[0], {"role": "assistant", "content": "  Cotton, blue.\n"}]
    r = Renderer(tok["llama3"], "chat", SLOTS).render(conv)
    assert runs(tok["llama3"], r) == LAYOUT["llama3"][:4]
    assert r.input_ids == hf_ids(tok["llama3"], conv)


def test_zero_slots_records_the_next_token_like_the_fixed_templates(tok):
    t = tok["chatml"]
    r = Renderer(t, "chat", 0).render(CONV, num_images=2)
    three = Renderer(t, "chat", SLOTS).render(CONV)
    assert [x for x in three.input_ids if x != image_token_id(t)] == r.input_ids
    assert r.image_starts == [s - SLOTS * k for k, s in enumerate(three.image_starts)]
    after = t.encode("\nWhat is this shirt made of?", add_special_tokens=False)
    assert r.input_ids[r.image_starts[0]:r.image_starts[0] + len(after)] == after
    assert render_masked(t, "chat", CONV, 0).count("[[<image×0>]]") == 2


def test_truncation_behaves_as_for_the_fixed_templates(tok):
    t = tok["chatml"]
    full = Renderer(t, "chat", SLOTS).render(CONV)
    first_label = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    with pytest.raises(SampleDropped) as exc:
        Renderer(t, "chat", SLOTS, max_length=first_label).render(CONV, key="p1-catqa-0")
    assert exc.value.reason == "no_label_after_truncation" and exc.value.key == "p1-catqa-0"
    r = Renderer(t, "chat", SLOTS, max_length=first_label + 1).render(CONV)
    assert len(r) == first_label + 1 and r.truncated and r.labels[-1] != IGNORE_INDEX
    second = full.image_starts[1]
    cut = Renderer(t, "chat", SLOTS, max_length=second + 2).render(CONV)
    assert len(cut) == second and cut.image_starts == [full.image_starts[0]]
    assert cut.input_ids == full.input_ids[:second] and cut.labels == full.labels[:second]
    with pytest.raises(SampleDropped) as exc:
        Renderer(t, "chat", SLOTS, max_length=10, truncate=False).render(CONV)
    assert exc.value.reason == "too_long"
    with pytest.raises(SampleDropped) as exc:
        Renderer(t, "chat", SLOTS).render(CONV[:1], key="k")
    assert exc.value.reason == "no_label"


def test_errors_name_the_tokenizer_or_the_sample(tok):
    none_dir = tok["none"].name_or_path
    with pytest.raises(UserError, match=f"tokenizer {none_dir} has no chat_template .*use template owl or alpaca"):
        Renderer(tok["none"], "chat", SLOTS)
    with_system = [{"role": "system", "content": "You sell shoes."}] + CONV
    mistral = Renderer(tok["mistral"], "chat", SLOTS)
    with pytest.raises(ChatTemplateError) as exc:
        mistral.render(with_system, key="p3-catqa-1")
    assert str(exc.value).startswith(f"p3-catqa-1: tokenizer {tok['mistral'].name_or_path}'s chat_template is not "
                                     "prefix-stable: rendered up to assistant turn 2 it does not start with")
    assert ("(first difference at character 10: 'You sell shoes.\\n\\n<image>\\nWhat is this sh' became "
            "'<image>\\nWhat is this shirt made of?[/INS'); per-turn label masks need every turn appended") in str(
        exc.value)
    assert isinstance(exc.value, ValueError)  # the loader counts it as a bad sample
    gemma = Renderer(tok["gemma"], "chat", SLOTS)
    with pytest.raises(ChatTemplateError, match=r"^p4-catqa-2: tokenizer .*/gemma's chat_template refused the "
                                                "conversation: System role not supported$"):
        gemma.render(with_system, key="p4-catqa-2")
    with pytest.raises(ChatTemplateError, match="^p5: .* refused the conversation: Conversation roles must alternate"):
        gemma.render([CONV[0], CONV[0], CONV[1]], key="p5")
    with pytest.raises(ValueError, match="^p6: <image> in an assistant turn$"):
        Renderer(tok["chatml"], "chat", SLOTS).render([CONV[0], {"role": "assistant", "content": "<image>"}],
                                                      key="p6")
    with pytest.raises(ChatTemplateError, match="^p7: the conversation starts with an assistant turn"):
        Renderer(tok["chatml"], "chat", SLOTS).render(CONV[1:], key="p7")


def test_render_masked_exact_string(tok):
    t = tok["chatml"]
    assert render_masked(t, "chat", CONV, 65) == (
        "[[<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n]][[<image×65>]]"
        "[[\nWhat is this shirt made of?<|im_end|>\n<|im_start|>assistant\n]]Cotton, blue.<|im_end|>"
        "[[\n<|im_start|>user\nCompare it with ]][[<image×65>]][[ please.<|im_end|>\n<|im_start|>assistant\n]]"
        "The second one is leather shoes.<|im_end|>[[\n]]")


def test_shards_inspect_render_with_the_chat_template(tok, tiny_shards, capsys):
    from mmtrain.data.loader.split_records import iter_shard_samples

    first = next(iter(iter_shard_samples(tiny_shards["mm"], "train")))
    (user, answer), key = [t["content"] for t in first["conversation"]], first["key"]
    assert user.startswith("<image>\n") and user.count("<image>") == 1
    tokdir = tok["llama3"].name_or_path
    argv = ["shards", "inspect", str(tiny_shards["mm"]), "--render", "1", "--tokenizer", tokdir, "--template", "chat"]
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith(
        f"\n--- {key}  (text in [[...]] carries no label)\n"
        "[[<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n]][[<image×1>]]"
        f"[[{user[len('<image>'):]}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n]]"
        f"{answer}<|eot_id|>\n")
    none_dir = tok["none"].name_or_path
    assert main(argv[:-3] + [none_dir, "--template", "chat"]) == 2
    assert f"mmtrain shards: error: tokenizer {none_dir} has no chat_template" in capsys.readouterr().err


@pytest.mark.parametrize("family, header", [("chatml", "<|im_start|>assistant\n"),
                                            ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n")])
def test_generation_prompt_ends_with_the_assistant_header(tok, family, header):
    t = tok[family]
    renderer = Renderer(t, "chat", SLOTS)
    prompt = render_prompt(renderer, CONV[:3], [b"a", b"b"], reference=CONV[3]["content"], key="k")
    full = renderer.render(CONV)
    answer_start = max(i for i, label in enumerate(full.labels) if label == IGNORE_INDEX and i < len(full) - 2) + 1
    assert prompt.input_ids == full.input_ids[:answer_start]  # the training ids up to the last answer
    assert prompt.image_starts == full.image_starts
    assert t.decode(prompt.answer_ids) == "The second one is leather shoes." + END_OF_TURN[family]
    one = render_prompt(Renderer(t, "chat", 1), CONV[:3], [b"a", b"b"])
    text = t.decode(one.input_ids)
    assert text.endswith(header) and one.answer_ids == []
    assert text == t.apply_chat_template(CONV[:3], tokenize=False, add_generation_prompt=True)


def test_recipe_template_chat_loads_and_names_are_checked(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: chat\ntemplate: chat\nstages:\n  - name: sft\n    data: [{shards: shards/x}]\n")
    assert load_recipe(path).template == "chat"
    path.write_text(path.read_text().replace("template: chat", "template: chatml"))
    with pytest.raises(UserError, match="template must be owl, alpaca or chat, not 'chatml'"):
        load_recipe(path)
    assert TemplateName.__args__ == TEMPLATE_NAMES == ("owl", "alpaca", "chat")
    assert get_template("chat").name == "chat" and get_template("chat").fixed_strings() == []
    with pytest.raises(ValueError, match="known: alpaca, owl, or chat \\(the tokenizer's own chat_template\\)"):
        get_template("chatml")


def test_doctor_tokenizer_row_fails_without_a_chat_template(tok, tmp_path):
    from mmtrain.config import recipe_from_dict
    from mmtrain.doctor.context import Context
    from mmtrain.doctor.tokenizer_checks import check_tokenizer

    def row(family: str, template: str = "chat"):
        raw = {"name": "t", "template": template, "tokenizer": tok[family].name_or_path,
               "stages": [{"name": "sft", "data": [{"shards": "x"}]}]}
        return check_tokenizer(Context(recipe_from_dict(raw), 1, "cpu", "fp32", tmp_path))

    failed = row("none")
    assert failed.status == "FAIL"
    assert f"template chat: tokenizer {tok['none'].name_or_path} has no chat_template" in failed.detail
    assert row("none", "owl").status == "PASS"
    assert row("llama3").status == "PASS" and "template 'chat'" in row("llama3").detail
    assert row("mistral").status == "PASS"  # prefix-stable without a system turn (the probe has none)


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "mistral"])
def test_generation_stops_at_the_templates_end_of_turn(tok, family):
    """An instruct model closes its turn with the template's marker, which is not always EOS: generation stops at
    either, and at nothing else."""
    from mmtrain.eval.generate import stop_ids

    t = tok[family]
    marker = t.convert_tokens_to_ids(END_OF_TURN[family])
    assert ChatTemplate(t).end_of_turn_ids() == [marker]
    assert stop_ids(t, "chat") == list(dict.fromkeys([t.eos_token_id, marker]))
    assert stop_ids(t, "owl") == [t.eos_token_id]
