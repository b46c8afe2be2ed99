"""Chat templates: one conversation → `input_ids`, `labels` (only assistant turns learn) and image slot positions.

The conversation is tokenized piece by piece (system line, role markers, user text, each image's slot run, assistant
text, EOS), and each piece carries its own learned/masked flag, so the mask cannot drift from the text: there is no
second pass that searches for turn boundaries in a rendered string (the LLaVA bug that masks whole samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mmtrain.data.tokenizer import IMAGE_TOKEN, image_token_id

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    """The fixed strings of one chat format. Images go inline at their mark, or into an image block per turn."""

    name: str
    system: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    image_prefix: str | None = None
    """When set, a user turn's images are lifted out of its text into blocks `image_prefix <slots> image_suffix`."""
    image_suffix: str = ""

    def fixed_strings(self) -> list[str]:
        """Every constant string the template emits (used to train tokenizers that know them)."""
        parts = [self.system, self.system_suffix, self.user_prefix, self.user_suffix, self.assistant_prefix,
                 self.assistant_suffix, self.image_prefix or "", self.image_suffix]
        return [p for p in parts if p.strip()]


TEMPLATES: dict[str, Template] = {
    "owl": Template(
        name="owl",
        system="The following is a conversation between a curious human and AI assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.",
        system_suffix="\n", user_prefix="Human: ", user_suffix="\n", assistant_prefix="AI: ", assistant_suffix="\n",
    ),
    "alpaca": Template(
        name="alpaca",
        system="Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.",
        system_suffix="\n\n", user_prefix="### Instruction:\n", user_suffix="\n\n",
        assistant_prefix="### Response:\n", assistant_suffix="\n\n", image_prefix="### Image:\n", image_suffix="\n\n",
    ),
}


def get_template(name: str) -> Template:
    """Look a template up by name; raises listing the known names."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


class SampleDropped(Exception):
    """The sample cannot be trained on (no label left, too long); `reason` is counted by the loader."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(f"{key or '?'}: {reason}")
        self.reason = reason
        self.key = key


@dataclass
class Rendered:
    """A rendered sample. `image_starts[i]` is where image i's run of `num_slots` placeholder tokens begins."""

    input_ids: list[int]
    labels: list[int]
    image_starts: list[int] = field(default_factory=list)
    num_slots: int = 0
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


# A piece is (kind, payload, learned): kind "text" (payload str), "image" (payload image index), "eos", "bos".
Piece = tuple[str, object, bool]


def conversation_pieces(template: Template, conversation: Sequence[dict], key: str | None = None) -> list[Piece]:
    """Lay a conversation out as template pieces, each flagged learned (assistant text + EOS) or masked."""
    turns = list(conversation)
    system = template.system
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    pieces: list[Piece] = [("bos", None, False), ("text", system + template.system_suffix, False)]
    image_index = 0
    for turn in turns:
        role, content = turn["role"], turn["content"]
        if role == "user":
            parts = content.split(IMAGE_TOKEN)
            if template.image_prefix is not None:
                for _ in parts[1:]:
                    pieces += [("text", template.image_prefix, False), ("image", image_index, False),
                               ("text", template.image_suffix, False)]
                    image_index += 1
                text = " ".join(p.strip() for p in parts if p.strip())
                pieces.append(("text", template.user_prefix + text + template.user_suffix, False))
            else:
                pieces.append(("text", template.user_prefix + parts[0], False))
                for part in parts[1:]:
                    pieces += [("image", image_index, False), ("text", part, False)]
                    image_index += 1
                pieces.append(("text", template.user_suffix, False))
        elif role == "assistant":
            if IMAGE_TOKEN in content:
                raise ValueError(f"{key or '?'}: {IMAGE_TOKEN} in an assistant turn")
            pieces += [("text", template.assistant_prefix, False), ("text", content, True), ("eos", None, True),
                       ("text", template.assistant_suffix, False)]
        else:
            raise ValueError(f"{key or '?'}: unknown role {role!r} (expected system first, then user/assistant)")
    return pieces


class Renderer:
    """Binds a tokenizer, a template and the model's slots per image; renders conversations to token ids."""

    def __init__(self, tokenizer, template: str, num_image_slots: int, max_length: int | None = None,
                 truncate: bool = True):
        if num_image_slots < 1:
            raise ValueError(f"num_image_slots must be >= 1, got {num_image_slots}")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.num_slots = num_image_slots
        self.max_length = max_length
        self.truncate = truncate
        self.image_id = image_token_id(tokenizer)
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
            if len(self._cache) < 4096 and len(text) < 512:
                self._cache[text] = ids
        return ids

    def render(self, conversation: Sequence[dict], num_images: int | None = None, key: str | None = None) -> Rendered:
        """Render to ids and labels; raises `SampleDropped` when nothing would be learned."""
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int] = []
        tok = self.tokenizer
        for kind, payload, learned in conversation_pieces(self.template, conversation, key):
            if kind == "text":
                piece = self._encode(payload)  # type: ignore[arg-type]
            elif kind == "image":
                starts.append(len(ids))
                piece = [self.image_id] * self.num_slots
            elif kind == "eos":
                piece = [tok.eos_token_id]
            else:
                piece = [tok.bos_token_id] if tok.bos_token_id is not None else []
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        if num_images is not None and num_images != len(starts):
            raise ValueError(f"{key or '?'}: {len(starts)} {IMAGE_TOKEN} marks but num_images={num_images}")
        if not any(label != IGNORE_INDEX for label in labels):
            raise SampleDropped("no_label", key)
        out = Rendered(ids, labels, starts, self.num_slots)
        if self.max_length is not None and len(ids) > self.max_length:
            if not self.truncate:
                raise SampleDropped("too_long", key)
            out = self._truncate(out, key)
        return out

    def _truncate(self, r: Rendered, key: str | None) -> Rendered:
        """Cut at max_length, never inside an image's slot run; drop the sample if no label survives."""
        cut = self.max_length
        assert cut is not None
        for start in r.image_starts:
            if start < cut < start + self.num_slots:
                cut = start
        labels = r.labels[:cut]
        if not any(label != IGNORE_INDEX for label in labels):
            raise SampleDropped("no_label_after_truncation", key)
        starts = [s for s in r.image_starts if s + self.num_slots <= cut]
        return Rendered(r.input_ids[:cut], labels, starts, self.num_slots, truncated=True)


def render_masked(tokenizer, template_name: str, conversation: Sequence[dict], num_image_slots: int) -> str:
    """Render a conversation as text with everything not learned wrapped in `[[...]]` (image runs as
    `<image×N>`), so a person can check the label mask by eye: only assistant text and its EOS stay bare."""
    r = Renderer(tokenizer, template_name, num_image_slots).render(conversation)
    out: list[str] = []
    i = 0
    image_id = image_token_id(tokenizer)
    while i < len(r.input_ids):
        if i in r.image_starts:
            out.append(f"[[<image×{num_image_slots}>]]")
            i += num_image_slots
            continue
        learned = r.labels[i] != IGNORE_INDEX
        j = i
        while (j < len(r.input_ids) and (r.labels[j] != IGNORE_INDEX) == learned and j not in r.image_starts
               and r.input_ids[j] != image_id):
            j += 1
        j = max(j, i + 1)
        text = tokenizer.decode(r.input_ids[i:j], skip_special_tokens=False)
        out.append(text if learned else f"[[{text}]]")
        i = j
    return "".join(out)
