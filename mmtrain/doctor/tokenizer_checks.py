"""Tokenizer checks: the saved tokenizer has the template's special tokens, and its vocabulary fits the model."""

from __future__ import annotations

from typing import Any

from mmtrain.data.loader.chat_template import ChatTemplate, ChatTemplateError
from mmtrain.data.loader.image_token import IMAGE_TOKEN, image_token_id
from mmtrain.data.loader.templates import CHAT, get_template
from mmtrain.doctor.context import Context, Unavailable
from mmtrain.doctor.report import Check, row
from mmtrain.errors import UserError
from mmtrain.model.checkpoint_configs import text_config_from


def _how_to_add(tokens: dict[str, Any]) -> str:
    return (f"retrain it (mmtrain tokenizer train) or add it: tok.add_special_tokens({tokens!r}); "
            f"tok.save_pretrained(DIR)")


def _token_id(tok: Any, token: str | None) -> int | None:
    if token is None:
        return None
    idx = tok.convert_tokens_to_ids(token)
    return None if idx is None or (idx == tok.unk_token_id and token != tok.unk_token) else int(idx)


CHAT_PROBE = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is this?"},
              {"role": "assistant", "content": "A shirt."},
              {"role": "user", "content": "Its colour?"},
              {"role": "assistant", "content": "Blue."}]
"""`template: chat` must render this plain two-turn conversation with per-turn masks."""


def check_tokenizer(ctx: Context) -> Check:
    """The tokenizer as saved (not as load_tokenizer patches it) has `<image>`, EOS and pad (FAIL) and BOS (WARN);
    the template exists; with `template: chat` the tokenizer has a chat_template that renders `CHAT_PROBE` (FAIL).
    Why FAIL rather than let load_tokenizer add them: an added token gets a new id past the saved vocabulary and an
    untrained embedding, and a pretrained LLM's vocabulary may have no room for it."""
    problems: list[tuple[str, str]] = []
    try:
        get_template(ctx.recipe.template)
    except ValueError as exc:
        problems.append(("FAIL", f"template: {exc}"))
    try:
        tok = ctx.raw_tokenizer()
    except Unavailable as exc:
        return row("tokenizer", [*problems, ("FAIL", f"{ctx.recipe.tokenizer}: cannot load: {exc}")], "")
    where = ctx.recipe.tokenizer
    if ctx.recipe.template == CHAT:
        try:
            ChatTemplate(tok).segments(CHAT_PROBE, key="a two-turn probe conversation")
        except ChatTemplateError as exc:
            problems.append(("FAIL", f"template chat: {exc}"))
    ids = {"image": _token_id(tok, IMAGE_TOKEN), "eos": tok.eos_token_id, "pad": tok.pad_token_id,
           "bos": tok.bos_token_id}
    if ids["image"] is None:
        problems.append(("FAIL", f"{where} lacks the image token {IMAGE_TOKEN}: "
                                 f"{_how_to_add({'additional_special_tokens': [IMAGE_TOKEN]})}"))
    for name in ("eos", "pad"):
        if ids[name] is None:
            problems.append(("FAIL", f"{where} has no {name} token: "
                                     f"{_how_to_add({f'{name}_token': '...'})}"))
    if ids["bos"] is None:
        problems.append(("WARN", f"{where} has no bos token: samples will start without one"))
    if ids["image"] is not None:
        clash = [n for n in ("eos", "pad", "bos") if ids[n] == ids["image"]]
        if clash:
            problems.append(("FAIL", f"{where}: {IMAGE_TOKEN} has the same id {ids['image']} as {', '.join(clash)}"))
    if ids["eos"] is not None and ids["eos"] == ids["bos"]:
        problems.append(("WARN", f"{where}: bos and eos share id {ids['eos']}"))
    shown = ", ".join(f"{n} {i}" for n, i in ids.items() if i is not None)
    return row("tokenizer", problems, f"{len(tok)} tokens; {shown}; template {ctx.recipe.template!r}")


def check_vocabulary(ctx: Context) -> Check:
    """Tokenizer ids fit the model's embedding table. From scratch the trainer sizes the vocabulary from the
    tokenizer (nothing to check); with `model.llm_path` or `model.init` the vocabulary is fixed: every token id must
    be below it, and an `init` model's image / eos / pad ids (kept from its config) must equal the tokenizer's."""
    spec = ctx.recipe.model
    try:
        tok = ctx.tokenizer()
    except Unavailable as exc:
        return Check("vocabulary", "WARN", f"not checked: the tokenizer does not load ({exc})")
    try:
        config = ctx.model_config()
    except Unavailable as exc:
        return Check("vocabulary", "FAIL", f"{exc}")
    vocab = int(config.text_config.get("vocab_size", 0))
    problems: list[tuple[str, str]] = []
    source = (f"model.init {spec.init}" if spec.init else f"model.init_from_hf {spec.init_from_hf}"
              if spec.init_from_hf else f"model.llm_path {spec.llm_path}" if spec.llm_path else None)
    if spec.init and len(tok) > vocab:
        problems.append(("FAIL", f"tokenizer has {len(tok)} tokens but {source} has vocab_size {vocab}: use the "
                                 f"tokenizer saved with that model"))
    grown = _pretrained_vocab(spec.llm_path) if spec.llm_path and not spec.init else None
    if grown is not None and grown < vocab:
        source = f"model.llm_path {spec.llm_path}'s {grown} rows grown to {vocab}, new rows at their mean"
    if config.image_token_id >= vocab:
        problems.append(("FAIL", f"image_token_id {config.image_token_id} ≥ vocab_size {vocab}"))
    if spec.init:
        if config.image_token_id != image_token_id(tok):
            problems.append(("FAIL", f"model.init {spec.init}: image_token_id {config.image_token_id} but the "
                                     f"tokenizer's <image> is {image_token_id(tok)}: use the tokenizer saved with "
                                     f"that model"))
        for name in ("eos", "pad"):
            ours, theirs = getattr(tok, f"{name}_token_id"), config.text_config.get(f"{name}_token_id")
            if theirs is not None and ours is not None and int(theirs) != int(ours):
                problems.append(("WARN", f"model.init {spec.init}: {name}_token_id {theirs} but the tokenizer's "
                                         f"is {ours}"))
    origin = f"fixed by {source}" if source else "sized from the tokenizer"
    return row("vocabulary", problems, f"{len(tok)} tokens ≤ vocab_size {vocab} ({origin})")


def _pretrained_vocab(path: str) -> int | None:
    """The vocabulary a pretrained LLM directory's config.json declares (None where it cannot be read)."""
    try:
        return int(text_config_from(path)["vocab_size"])
    except (UserError, KeyError, TypeError, ValueError):
        return None
