"""Label masks: only assistant text + EOS learn; layouts spelled out literally; truncation drops what cannot learn."""

from dataclasses import replace

import pytest
from loader_fixtures import tiny_tokenizer

from mmtrain.data.loader.templates import IGNORE_INDEX, Renderer, SampleDropped, render_masked
from mmtrain.data.loader.image_token import image_token_id

SLOTS = 4
CONV = [
    {"role": "user", "content": "<image>\nWhat is this shirt made of?"},
    {"role": "assistant", "content": "Cotton, blue."},
    {"role": "user", "content": "Compare it with <image> please."},
    {"role": "assistant", "content": "The second one is leather shoes."},
    {"role": "user", "content": "Which is for summer?"},
    {"role": "assistant", "content": "The shirt."},
]
OWL_SYS = ("The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
           "detailed, and polite answers to the user's questions.")
ALPACA_SYS = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.")
IMG, EOS, BOS = object(), object(), object()

# The expected layouts, literally: (piece, learned)
LAYOUT = {
    "owl": [(BOS, False), (OWL_SYS + "\n", False), ("Human: ", False), (IMG, False),
            ("\nWhat is this shirt made of?", False), ("\n", False),
            ("AI: ", False), ("Cotton, blue.", True), (EOS, True), ("\n", False),
            ("Human: Compare it with ", False), (IMG, False), (" please.", False), ("\n", False),
            ("AI: ", False), ("The second one is leather shoes.", True), (EOS, True), ("\n", False),
            ("Human: Which is for summer?", False), ("\n", False),
            ("AI: ", False), ("The shirt.", True), (EOS, True), ("\n", False)],
    "alpaca": [(BOS, False), (ALPACA_SYS + "\n\n", False),
               ("### Image:\n", False), (IMG, False), ("\n\n", False),
               ("### Instruction:\nWhat is this shirt made of?\n\n", False),
               ("### Response:\n", False), ("Cotton, blue.", True), (EOS, True), ("\n\n", False),
               ("### Image:\n", False), (IMG, False), ("\n\n", False),
               ("### Instruction:\nCompare it with please.\n\n", False),
               ("### Response:\n", False), ("The second one is leather shoes.", True), (EOS, True), ("\n\n", False),
               ("### Instruction:\nWhich is for summer?\n\n", False),
               ("### Response:\n", False), ("The shirt.", True), (EOS, True), ("\n\n", False)],
}


def expected(tok, layout):
    ids, learned_positions, image_starts = [], [], []
    for piece, learned in layout:
        if piece is BOS:
            p = [tok.bos_token_id]
        elif piece is EOS:
            p = [tok.eos_token_id]
        elif piece is IMG:
            image_starts.append(len(ids))
            p = [image_token_id(tok)] * SLOTS
        else:
            p = tok.encode(piece, add_special_tokens=False)
        if learned:
            learned_positions += range(len(ids), len(ids) + len(p))
        ids += p
    return ids, learned_positions, image_starts


@pytest.mark.parametrize("name", ["owl", "alpaca"])
def test_three_turns_two_images_exact_label_positions(name):
    tok = tiny_tokenizer()
    r = Renderer(tok, name, SLOTS).render(CONV, num_images=2, key="k")
    ids, learned_positions, image_starts = expected(tok, LAYOUT[name])
    assert r.input_ids == ids
    assert [i for i, label in enumerate(r.labels) if label != IGNORE_INDEX] == learned_positions
    assert r.image_starts == image_starts
    for s in image_starts:  # image slots are placeholders, masked
        assert r.input_ids[s:s + SLOTS] == [image_token_id(tok)] * SLOTS
        assert r.labels[s:s + SLOTS] == [IGNORE_INDEX] * SLOTS
    assert all(r.labels[i] == r.input_ids[i] for i in learned_positions)
    # decoding the labelled tokens gives back exactly the assistant text + EOS, turn by turn
    runs, run = [], []
    for i, label in enumerate(r.labels):
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    answers = [t["content"] for t in CONV if t["role"] == "assistant"]
    assert [tok.decode(x) for x in runs] == [a + tok.eos_token for a in answers]
    assert tok.decode([x for x in r.labels if x != IGNORE_INDEX]) == "".join(a + tok.eos_token for a in answers)


@pytest.mark.parametrize("name", ["owl", "alpaca"])
def test_text_only_same_template(name):
    tok = tiny_tokenizer()
    conv = [{"role": "user", "content": "Name a summer dress."}, {"role": "assistant", "content": "A cotton dress."}]
    r = Renderer(tok, name, 65).render(conv, num_images=0)
    assert r.image_starts == [] and image_token_id(tok) not in r.input_ids
    assert tok.decode([x for x in r.labels if x != IGNORE_INDEX]) == "A cotton dress." + tok.eos_token
    text = tok.decode(r.input_ids)
    assert ("Human: Name a summer dress." in text) if name == "owl" else ("### Instruction:\nName a summer" in text)


def test_system_turn_replaces_default_and_slots_argument():
    tok = tiny_tokenizer()
    conv = [{"role": "system", "content": "You sell shoes."}] + CONV[:2]
    r = Renderer(tok, "owl", 65).render(conv)
    assert tok.decode(r.input_ids[: 1 + len(tok.encode("You sell shoes.\n", add_special_tokens=False))]) == (
        tok.bos_token + "You sell shoes.\n")
    assert r.input_ids.count(image_token_id(tok)) == 65
    assert Renderer(tok, "owl", 1).render(conv).input_ids.count(image_token_id(tok)) == 1


def test_truncation_never_trains_without_labels():
    tok = tiny_tokenizer()
    full = Renderer(tok, "owl", SLOTS).render(CONV)
    first_label = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    with pytest.raises(SampleDropped) as exc:
        Renderer(tok, "owl", SLOTS, max_length=first_label).render(CONV, key="p1-catqa-0")
    assert exc.value.reason == "no_label_after_truncation" and exc.value.key == "p1-catqa-0"
    r = Renderer(tok, "owl", SLOTS, max_length=first_label + 1).render(CONV)
    assert len(r) == first_label + 1 and r.truncated and r.labels[-1] != IGNORE_INDEX
    # a cut inside the second image's slot run cuts before it, and that image is dropped
    second = full.image_starts[1]
    cut = Renderer(tok, "owl", SLOTS, max_length=second + 2).render(CONV)
    assert len(cut) == second and cut.image_starts == [full.image_starts[0]]
    with pytest.raises(SampleDropped) as exc:
        Renderer(tok, "owl", SLOTS, max_length=10, truncate=False).render(CONV)
    assert exc.value.reason == "too_long"


def test_errors_name_the_sample():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="p7-catqa-1.*num_images=3"):
        Renderer(tok, "owl", SLOTS).render(CONV, num_images=3, key="p7-catqa-1")
    with pytest.raises(ValueError, match="unknown chat template 'chatml'; known: alpaca, owl"):
        Renderer(tok, "chatml", SLOTS)
    with pytest.raises(SampleDropped):
        Renderer(tok, "owl", SLOTS).render([{"role": "user", "content": "hi"}])


def test_render_masked_marks_everything_not_learned():
    tok = tiny_tokenizer()
    text = render_masked(tok, "owl", CONV, 65)
    assert text.startswith("[[" + tok.bos_token + OWL_SYS)
    assert "[[<image×65>]]" in text
    assert "AI: ]]Cotton, blue." + tok.eos_token + "[[\nHuman: Compare it with ]][[<image×65>]]" in text
    assert text.endswith("The shirt." + tok.eos_token + "[[\n]]")


# Layer-wise adapters: 0 slots per image. Positions below were read off the tiny tokenizer once and are asserted
# literally, on top of the layout-derived expectation.
ZERO_SLOT_STARTS = {"owl": [75, 130], "alpaca": [52, 106]}
ZERO_SLOT_LENGTH = {"owl": 193, "alpaca": 198}


@pytest.mark.parametrize("name", ["owl", "alpaca"])
def test_zero_slots_mark_renders_to_nothing_and_records_next_token(name):
    tok = tiny_tokenizer()
    r = Renderer(tok, name, 0).render(CONV, num_images=2, key="k")
    layout = [(p, learned) for p, learned in LAYOUT[name]]
    ids, learned_positions, image_starts = expected_with_slots(tok, layout, 0)
    assert r.input_ids == ids and image_token_id(tok) not in r.input_ids
    assert [i for i, label in enumerate(r.labels) if label != IGNORE_INDEX] == learned_positions
    assert r.image_starts == image_starts == ZERO_SLOT_STARTS[name]
    assert len(r) == ZERO_SLOT_LENGTH[name] and r.num_slots == 0
    # the recorded position is the first token of the text that followed the mark
    after = "\nWhat is this shirt made of?" if name == "owl" else "\n\n"
    first = image_starts[0]
    assert r.input_ids[first:first + len(tok.encode(after, add_special_tokens=False))] == tok.encode(
        after, add_special_tokens=False)
    # same ids as the 4-slot rendering with the placeholder runs taken out
    four = Renderer(tok, name, SLOTS).render(CONV)
    assert [t for t in four.input_ids if t != image_token_id(tok)] == r.input_ids
    assert [s - SLOTS * k for k, s in enumerate(four.image_starts)] == r.image_starts
    assert render_masked(tok, name, CONV, 0).count("[[<image×0>]]") == 2


def expected_with_slots(tok, layout, slots):
    ids, learned_positions, image_starts = [], [], []
    for piece, learned in layout:
        if piece is IMG:
            image_starts.append(len(ids))
            continue
        p = ([tok.bos_token_id] if piece is BOS else [tok.eos_token_id] if piece is EOS
             else tok.encode(piece, add_special_tokens=False))
        if learned:
            learned_positions += range(len(ids), len(ids) + len(p))
        ids += p
    assert slots == 0
    return ids, learned_positions, image_starts


def test_zero_slots_mark_at_the_end_is_clamped_and_truncation_drops_unseen_images():
    tok = tiny_tokenizer()
    renderer = Renderer(tok, "owl", 0)
    renderer.template = replace(renderer.template, user_suffix="")  # nothing is emitted after a final mark
    conv = CONV[:2] + [{"role": "user", "content": "And this one? <image>"}]
    r = renderer.render(conv, num_images=2)
    first, second = ZERO_SLOT_STARTS["owl"]
    assert r.image_starts == [first, len(r) - 1]  # would be len(r): clamped onto the sample's last token
    # a cut exactly at an image's position leaves no token that could see it: the image is dropped
    cut = Renderer(tok, "owl", 0, max_length=second).render(CONV)
    assert len(cut) == second and cut.truncated and cut.image_starts == [first]
    kept = Renderer(tok, "owl", 0, max_length=second + 1).render(CONV)
    assert kept.image_starts == [first, second]
    with pytest.raises(ValueError, match="num_image_slots must be >= 0, got -1"):
        Renderer(tok, "owl", -1)
