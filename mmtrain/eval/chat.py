"""Multi-turn chat and JSONL batch requests on top of `Generator`.

Chat keeps the whole conversation (and its images, in mark order) and re-renders it each turn with the model's
template, so turn N sees turns 1..N-1 exactly as a multi-turn training sample would lay them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from PIL import Image, UnidentifiedImageError

from mmtrain.errors import UserError
from mmtrain.eval.generate import Generator
from mmtrain.eval.prompts import Prompt, user_turn

HELP = "commands: /image PATH (attach to your next message), /reset, /quit"


def read_image(path: str | Path) -> bytes:
    """An image file's bytes, checked to decode (a bad path is the user's mistake, reported in one line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: no such image file")
    data = p.read_bytes()
    try:
        with Image.open(p) as img:
            img.verify()
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{p}: not a readable image ({exc})") from None
    return data


@dataclass
class ChatSession:
    """The state of one chat: turns so far, their images, images waiting for the next user message."""

    generator: Generator
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    pending: list[bytes] = field(default_factory=list)

    def reset(self) -> None:
        self.turns, self.images, self.pending = [], [], []

    def attach(self, path: str) -> None:
        self.pending.append(read_image(path))

    def ask(self, text: str) -> str:
        """One user message (with the pending images) → the model's answer, which joins the history."""
        turn = user_turn(text, len(self.pending))
        prompt = self.generator.prompt(self.turns + [turn], self.images + self.pending)
        answer = self.generator.generate([prompt], max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                         top_k=self.top_k, top_p=self.top_p, seed=self.seed)[0]
        self.turns += [turn, {"role": "assistant", "content": answer}]
        self.images += self.pending
        self.pending = []
        return answer


def run_chat(session: ChatSession, lines: Iterable[str], out: TextIO, prompt_marker: str = "> ") -> None:
    """The chat loop over `lines` (stdin in the CLI); answers and notices go to `out`."""
    out.write(HELP + "\n" + prompt_marker)
    out.flush()
    for raw in lines:
        line = raw.rstrip("\n")
        stripped = line.strip()
        if stripped in ("/quit", "/exit"):
            break
        if stripped == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
        elif stripped.startswith("/image"):
            path = stripped[len("/image"):].strip()
            try:
                if not path:
                    raise UserError("usage: /image PATH")
                session.attach(path)
                out.write(f"(image attached: {len(session.pending)} waiting for your next message)\n")
            except UserError as exc:
                out.write(f"error: {exc}\n")
        elif stripped.startswith("/"):
            out.write(f"unknown command {stripped.split()[0]}; {HELP}\n")
        elif stripped:
            try:
                out.write(session.ask(line) + "\n")
            except (UserError, ValueError) as exc:
                out.write(f"error: {exc}\n")
        out.write(prompt_marker)
        out.flush()
    out.write("\n")


def read_requests(path: str | Path, base: Path | None = None) -> list[dict[str, Any]]:
    """JSONL requests `{"prompt": str, "images": [path, ...]}`; a relative image path that does not exist from the
    working directory is taken relative to the requests file's folder."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such requests file")
    base = base or p.parent
    requests = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{p}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            raise UserError(f'{p}:{n}: each line needs {{"prompt": str, "images": [paths]}}')
        images = req.get("images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UserError(f"{p}:{n}: images must be a list of paths")
        requests.append({**req, "images": [i if Path(i).exists() else str(base / i) for i in images]})
    return requests


def request_prompt(generator: Generator, prompt: str, image_paths: list[str]) -> Prompt:
    images = [read_image(i) for i in image_paths]
    try:
        return generator.prompt([user_turn(prompt, len(images))], images)
    except ValueError as exc:
        raise UserError(str(exc)) from None
