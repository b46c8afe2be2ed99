"""Chat templates: one conversation → `input_ids`, `labels` (only assistant turns learn) and image slot positions.

The conversation is tokenized piece by piece (system line, role markers, user text, each image's slot run, assistant
text, EOS), and each piece carries its own learned/masked flag, so the mask cannot drift from the text: there is no
second pass that searches for turn boundaries in a rendered string (the LLaVA bug that masks whole samples).
`owl` and `alpaca` are fixed strings here; `chat` renders with the tokenizer's own jinja chat_template
(chat_template.py: learned / masked by character span, tokenized whole) and shares the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from mmtrain.data.loader.chat_template import ChatTemplate
from mmtrain.data.loader.image_token import IMAGE_TOKEN, image_token_id
from mmtrain.data.loader.token_cache import TokenCache

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


CHAT = "chat"
"""The template that renders with the tokenizer's own jinja `chat_template` (chat_template.py)."""
TEMPLATE_NAMES = (*TEMPLATES, CHAT)
"""Every name a recipe's `template` may take (config/recipe.py lists the same, tested)."""
_CHAT = Template(name=CHAT, system="", system_suffix="", user_prefix="", user_suffix="", assistant_prefix="",
                 assistant_suffix="")
"""`template: chat` has no fixed strings of its own: they come from the tokenizer."""


def get_template(name: str) -> Template:
    """Look a template up by name; raises listing the known names."""
    if name == CHAT:
        return _CHAT
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}, or {CHAT} (the "
                         "tokenizer's own chat_template)")
    return TEMPLATES[name]


class SampleDropped(Exception):
    """The sample cannot be trained on (no label left, too long); `reason` is counted by the loader."""

    def __init__(self, reason: str, key: str | None = None):
        super().__init__(f"{key or '?'}: {reason}")
        self.reason = reason
        self.key = key


@dataclass
class Rendered:
    """A rendered sample. `image_starts[i]` is where image i's run of `num_slots` placeholder tokens begins; with
    0 slots (layer-wise adapters) it is the first token after where the `<image>` mark was (see `Renderer`)."""

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
    """Binds a tokenizer, a template and the model's slots per image; renders conversations to token ids.

    `num_image_slots == 0` (layer-wise adapters add no tokens): an `<image>` mark renders to nothing and
    `image_starts[i]` is the position of the first token after the mark; tokens at or after it see the image. A mark
    with no token after it (only possible with a template that emits nothing after an image) is clamped to the
    sample's last token, so the position always lies inside the sample (in a packed row, one past the end would be
    the next sample's first token). Truncation drops an image whose first token after the mark was cut.

    `template="chat"` renders with the tokenizer's own chat_template and tokenizes the rendering whole
    (`ChatTemplate.encode`: BOS and end-of-turn tokens are in its text); labels, checks and truncation are shared.

    Speed: pieces are looked up in a bounded token cache (`TokenCache`: the template's fixed strings for good, the
    repeated prompt phrasings while they keep coming); the unseen pieces of a conversation go to the fast
    tokenizer's Rust `encode_batch` in one call (see `batch_encoder`). `chat` costs about 20× more per sample (two
    jinja renders and one encode with offsets: ~0.2 ms), still small beside decoding the sample's images.
    """

    def __init__(self, tokenizer, template: str, num_image_slots: int, max_length: int | None = None,
                 truncate: bool = True):
        if num_image_slots < 0:
            raise ValueError(f"num_image_slots must be >= 0, got {num_image_slots}")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.num_slots = num_image_slots
        self.max_length = max_length
        self.truncate = truncate
        self.image_id = image_token_id(tokenizer)
        self.chat = ChatTemplate(tokenizer, self.image_id) if template == CHAT else None
        t = self.template
        fixed = [t.system + t.system_suffix, *t.fixed_strings(), t.user_suffix, t.assistant_suffix, t.image_suffix]
        self.tokens = TokenCache(batch_encoder(tokenizer), fixed)
        """Token ids of the pieces, cached (bounded) so repeated strings are tokenized once (token_cache.py)."""
        self._slot_run = [self.image_id] * num_image_slots
        self._eos = [tokenizer.eos_token_id]
        self._bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def render(self, conversation: Sequence[dict], num_images: int | None = None, key: str | None = None) -> Rendered:
        """Render to ids and labels; raises `SampleDropped` when nothing would be learned."""
        if self.chat is None:
            ids, starts, learned_spans = self._assemble(conversation_pieces(self.template, conversation, key))
        else:
            ids, starts, learned_spans = self.chat.encode(conversation, self._slot_run, key)
        if num_images is not None and num_images != len(starts):
            raise ValueError(f"{key or '?'}: {len(starts)} {IMAGE_TOKEN} marks but num_images={num_images}")
        if not learned_spans:
            raise SampleDropped("no_label", key)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in learned_spans:
            labels[start:end] = ids[start:end]
        if self.max_length is not None and len(ids) > self.max_length:
            if not self.truncate:
                raise SampleDropped("too_long", key)
            return self._truncate(Rendered(ids, labels, starts, self.num_slots), key)
        if self.num_slots == 0 and starts and starts[-1] >= len(ids):
            starts = [min(s, len(ids) - 1) for s in starts]
        return Rendered(ids, labels, starts, self.num_slots)

    def _assemble(self, pieces: list[Piece]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Pieces → (ids, image slot run starts, learned token spans), each text piece tokenized on its own."""
        tokens = iter(self.tokens.ids([p[1] for p in pieces if p[0] == "text"]))  # type: ignore[misc]
        ids: list[int] = []
        starts: list[int] = []
        learned_spans = []
        for kind, _, learned in pieces:
            if kind == "text":
                piece = next(tokens)
            elif kind == "image":
                starts.append(len(ids))
                piece = self._slot_run
            elif kind == "eos":
                piece = self._eos
            else:
                piece = self._bos
            if learned and piece:
                learned_spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
        return ids, starts, learned_spans

    def _truncate(self, r: Rendered, key: str | None) -> Rendered:
        """Cut at max_length, never inside an image's slot run; drop the sample if no label survives. An image
        survives when its whole run (0 slots: its first token after the mark) is before the cut."""
        cut = self.max_length
        assert cut is not None
        for start in r.image_starts:
            if start < cut < start + self.num_slots:
                cut = start
        labels = r.labels[:cut]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleDropped("no_label_after_truncation", key)
        span = max(self.num_slots, 1)
        starts = [s for s in r.image_starts if s + span <= cut]
        return Rendered(r.input_ids[:cut], labels, starts, self.num_slots, truncated=True)


def batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts → ids without special tokens, in one call. Uses the fast tokenizer's Rust backend directly (about 3×
    less overhead than the Python wrapper; without offsets where the backend can) after checking on a probe that it
    gives the wrapper's ids exactly."""

    def wrapper(texts: list[str]) -> list[list[int]]:
        return [tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return wrapper

    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use: ~1.5x less per call here
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

    def fast(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    probe = ["Human: What is this <image> made of?\n", " leading space  and ünïcode ☃ #12", "\n\n", "AI: ", "x"]
    return fast if fast(probe) == wrapper(probe) else wrapper


def render_masked(tokenizer, template_name: str, conversation: Sequence[dict], num_image_slots: int) -> str:
    """Render a conversation as text with everything not learned wrapped in `[[...]]` (image runs as
    `<image×N>`, placed before the token they start at), so a person can check the label mask by eye: only
    assistant text and its EOS (with `chat`: the template's end-of-turn) stay bare."""
    r = Renderer(tokenizer, template_name, num_image_slots).render(conversation)
    out: list[str] = []
    ids, labels, starts = r.input_ids, r.labels, sorted(r.image_starts)
    image_id = image_token_id(tokenizer)
    i = k = 0
    while i < len(ids):
        if k < len(starts) and starts[k] == i:
            out.append(f"[[<image×{num_image_slots}>]]")
            i += num_image_slots
            k += 1
            continue
        learned = labels[i] != IGNORE_INDEX
        j = i
        while (j < len(ids) and (labels[j] != IGNORE_INDEX) == learned and (k >= len(starts) or j < starts[k])
               and ids[j] != image_id):
            j += 1
        j = max(j, i + 1)
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        out.append(text if learned else f"[[{text}]]")
        i = j
    return "".join(out)
