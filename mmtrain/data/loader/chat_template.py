"""`template: chat`: render conversations with the tokenizer's own jinja `chat_template`, with per-turn label masks.

Why not search the rendered string for turn boundaries: that is the LLaVA bug the fixed templates avoid (a boundary
found in the wrong place masks a whole sample). Instead the template is rendered as text, with
`tokenizer.apply_chat_template(..., tokenize=False)`, at the two boundaries of every assistant turn:

- `head`: the conversation before the turn, with `add_generation_prompt=True`: it ends where the answer starts;
- `end`: the conversation up to and including the turn: it ends after the template's close of that turn.

Each rendering must start with the one before it (the template is *prefix-stable*), so the text between two
boundaries is exactly what the template emits for that stretch, and every character of the final rendering is known
to be learned or not: the answer and the end-of-turn text after it (up to and including the first run of special
tokens after the answer: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, `<|end|>`; with no special token
there, the close up to its trailing whitespace) are learned; system, user turns, role headers, the generation
prompt and what follows an end-of-turn (a newline) are masked. Works for templates without `{% generation %}`
markers.

The whole rendering is then tokenized once, with character offsets, and a token is learned when it overlaps learned
text. Why not piece by piece like the fixed templates: sentencepiece-style tokenizers (Mistral, Llama-2, Phi-3)
prefix every separately encoded piece with `▁`, so an answer would be learned as " answer"; whole, the ids are the
tokenizer's own for the template's text (what `apply_chat_template(tokenize=True)` gives). Each `<image>` token
becomes the image's slot run. BOS is not added: chat templates render `bos_token` as text where the family wants
one. A generation prompt (eval/prompts.py: the conversation plus an assistant turn, cut where its answer starts)
thus ends with exactly the template's `add_generation_prompt=True` rendering.

A template that re-renders earlier text (e.g. moves the system prompt into the last user turn) is refused with a
`ChatTemplateError` naming the tokenizer; so is a conversation the template raises on (Gemma or Mistral rejecting a
system role or a broken user/assistant alternation), naming the sample key.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Any, Sequence

from mmtrain.data.loader.image_token import IMAGE_TOKEN
from mmtrain.errors import UserError

Encoded = tuple[list[int], list[int], list[tuple[int, int]]]
"""(input_ids, image slot run starts, learned token spans [start, end))."""


class ChatTemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot render this (or any) conversation with per-turn label masks.

    A ValueError, so the loader counts it as a bad sample like any conversation a template refuses; a UserError, so
    the command line prints it as one line."""


def tokenizer_name(tokenizer: Any) -> str:
    """The tokenizer's directory (as loaded), for error messages."""
    return f"tokenizer {getattr(tokenizer, 'name_or_path', '') or '(in memory)'}"


END_OF_TURN_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


class ChatTemplate:
    """Renders a conversation with the tokenizer's `chat_template` into ids and learned token spans (see the module
    docstring); `image_id` is needed by `encode` only (`segments` checks a template without tokenizing)."""

    def __init__(self, tokenizer: Any, image_id: int | None = None):
        self.tokenizer = tokenizer
        self.image_id = image_id
        self.where = tokenizer_name(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"{self.where} has no chat_template (template: chat renders with the "
                                    "tokenizer's own): use template owl or alpaca, or add a chat_template to its "
                                    "tokenizer_config.json / chat_template.jinja")
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {str(t.content) for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials.discard(IMAGE_TOKEN)
        ordered = sorted((s for s in specials if s), key=len, reverse=True)  # longest first: no prefix shadows one
        self._special_run = re.compile("(?:" + "|".join(map(re.escape, ordered)) + ")+") if ordered else None
        """A run of consecutive special tokens: the learned end of an assistant turn ends with the first one."""

    def encode(self, conversation: Sequence[dict], slot_run: list[int], key: str | None = None) -> Encoded:
        """Ids of the whole rendering (each `<image>` token replaced by `slot_run`), where each slot run starts, and
        the learned token spans: a token is learned when its characters overlap learned text."""
        if self.image_id is None:
            raise ValueError("ChatTemplate.encode needs the tokenizer's image token id")
        segments = self.segments(conversation, key)
        tokens, offsets = self._tokenize("".join(text for text, _ in segments))
        begins = [o[0] for o in offsets]
        ends = [o[1] for o in offsets]
        spans: list[tuple[int, int]] = []  # learned tokens, before image tokens are widened to slot runs
        at = 0
        for text, learned in segments:
            if learned and text:
                first, last = bisect_right(ends, at), bisect_left(begins, at + len(text))
                if first < last:
                    if spans and spans[-1][1] >= first:
                        spans[-1] = (spans[-1][0], last)
                    else:
                        spans.append((first, last))
            at += len(text)
        images = [i for i, token in enumerate(tokens) if token == self.image_id]
        marks = sum(t["content"].count(IMAGE_TOKEN) for t in conversation if t["role"] != "assistant")
        if len(images) != marks:
            raise ChatTemplateError(f"{key or '?'}: the conversation has {marks} {IMAGE_TOKEN} marks but "
                                    f"{self.where}'s chat_template rendered {len(images)}: it drops or repeats turn "
                                    "text")
        if not images:
            return tokens, [], spans
        widen = len(slot_run) - 1
        ids: list[int] = []
        starts: list[int] = []
        done = 0
        for i in images:
            ids += tokens[done:i]
            starts.append(len(ids))
            ids += slot_run
            done = i + 1
        ids += tokens[done:]
        # no learned token is an image token (assistant turns hold no marks): shift by the images before each span
        shifted = [(a + widen * bisect_left(images, a), b + widen * bisect_left(images, a)) for a, b in spans]
        return ids, starts, shifted

    def end_of_turn_ids(self) -> list[int]:
        """The special tokens that close an assistant turn in this template (`<|im_end|>`, `<|eot_id|>`,
        `<end_of_turn>`, …), or its one-token marker: where generation stops, besides EOS; empty when neither."""
        close = self.segments(END_OF_TURN_PROBE, key="an end-of-turn probe")[3][0]
        found = self._special_run.search(close) if self._special_run is not None else None
        if found:
            return self._tokenize(found.group(0))[0]
        marker = self._tokenize(close.strip())[0] if close.strip() else []
        return marker if len(marker) == 1 else []  # a one-token marker the tokenizer does not flag special

    def segments(self, conversation: Sequence[dict], key: str | None = None) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, learned) segments, in order; joined they are the whole rendering."""
        name = key or "?"
        messages = [{"role": turn["role"], "content": turn["content"]} for turn in conversation]
        if not messages:
            raise ChatTemplateError(f"{name}: empty conversation")
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in answers:
            if IMAGE_TOKEN in messages[i]["content"]:
                raise ValueError(f"{name}: {IMAGE_TOKEN} in an assistant turn")
        if answers and answers[0] == 0:
            raise ChatTemplateError(f"{name}: the conversation starts with an assistant turn; template: chat needs "
                                    "a system or user turn before it")
        heads = self._render([messages[:i] for i in answers], True, name)
        ends = self._render([messages[:i + 1] for i in answers], False, name)
        closing = self._render([messages], False, name) if answers[-1:] != [len(messages) - 1] else []
        segments: list[tuple[str, bool]] = []
        done = ""
        for turn, (i, head, end) in enumerate(zip(answers, heads, ends), 1):
            segments.append((self._extend(done, head, f"assistant turn {turn}", name), False))
            rest = self._extend(head, end, f"the end of assistant turn {turn}", name)
            lead, answer, close, trail = self._split_answer(rest, messages[i]["content"], turn, name)
            segments += [(lead, False), (answer, True), (close, True), (trail, False)]
            done = end
        for text in closing:
            segments.append((self._extend(done, text, "the last turn", name), False))
        return segments

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text`, no special tokens added (the template wrote BOS where wanted)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(self.tokenizer, "is_fast", False):
            encoding = backend.encode(text, add_special_tokens=False)
            return encoding.ids, encoding.offsets
        try:
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise ChatTemplateError(f"{self.where}: template chat needs a fast tokenizer (tokenizer.json) for "
                                    "character offsets") from None
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]

    def _render(self, prefixes: list[list[dict]], generation: bool, name: str) -> list[str]:
        """Each prefix rendered as text, in one batched call; a template's own error names the sample."""
        if not prefixes:
            return []
        # jinja2 comes with transformers' chat templates; imported here so a missing jinja2 only fails template: chat
        from jinja2 import TemplateError

        try:
            out = self.tokenizer.apply_chat_template(prefixes, tokenize=False, add_generation_prompt=generation)
        except TemplateError as exc:
            raise ChatTemplateError(f"{name}: {self.where}'s chat_template refused the conversation: {exc}") from None
        return [out] if isinstance(out, str) else list(out)

    def _extend(self, before: str, after: str, what: str, name: str) -> str:
        """The text `after` adds to `before`; raises when the template re-rendered earlier text."""
        if after.startswith(before):
            return after[len(before):]
        at = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        raise ChatTemplateError(
            f"{name}: {self.where}'s chat_template is not prefix-stable: rendered up to {what} it does not start "
            f"with its rendering of the turns before (first difference at character {at}: "
            f"{before[at:at + 40]!r} became {after[at:at + 40]!r}); per-turn label masks need every turn appended "
            "at the end (a template that e.g. moves the system prompt into the last user turn cannot be masked "
            "this way): use template owl or alpaca, or a chat_template that renders turns in order")

    def _split_answer(self, rest: str, content: str, turn: int, name: str) -> tuple[str, str, str, str]:
        """What the template emitted for one assistant turn → (masked lead, answer, learned close, masked trail).
        The answer is the content verbatim, or stripped (templates that `trim` it) after masked whitespace."""
        if rest.startswith(content):
            lead, answer = "", content
        else:
            answer, body = content.strip(), rest.lstrip()
            if not answer or not body.startswith(answer):
                raise ChatTemplateError(
                    f"{name}: {self.where}'s chat_template does not render assistant turn {turn}'s text (verbatim or "
                    f"stripped) right after its generation prompt: got {rest[:60]!r}")
            lead = rest[:len(rest) - len(body)]
        tail = rest[len(lead) + len(answer):]
        found = self._special_run.search(tail) if self._special_run is not None else None
        cut = found.end() if found else len(tail.rstrip())
        return lead, answer, tail[:cut], tail[cut:]
