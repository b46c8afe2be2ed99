"""Complete checkpoints: DeepSpeed engine state + recipe + stage/step + every rank's data cursor and RNG + tokenizer.

A checkpoint folder counts only once `complete.json` is in it, written by rank 0 after every rank has written its
part, so a crash during a save never leaves a "latest" that cannot be loaded. Resume needs this folder alone.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

COMPLETE = "complete.json"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    stage_index: int
    stage: str
    step: int

    @property
    def tag(self) -> str:
        return self.path.name


def checkpoint_tag(stage_index: int, stage: str, step: int) -> str:
    return f"stage{stage_index}-{stage}-step{step:07d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
             "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))

    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))


def write_rank_state(folder: Path, rank: int, cursor: dict[str, Any]) -> None:
    """This rank's data cursor and RNG states (every rank calls this for its own file)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"rank-{rank}.json", {"cursor": cursor, "rng": _rng_state()})


def read_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / f"rank-{rank}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no state for rank {rank} (was it taken with fewer ranks?)")
    state = json.loads(path.read_text(encoding="utf-8"))
    _set_rng_state(state["rng"])
    return state["cursor"]


def mark_complete(folder: Path, trainer_state: dict[str, Any], recipe: dict[str, Any], tokenizer_dir: str | None,
                  image_config: dict[str, Any]) -> None:
    """Rank 0, after every rank has written its part: the self-describing extras, then the completion mark."""
    write_json_atomic(folder / TRAINER_STATE, trainer_state)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    write_json_atomic(folder / "image_processor.json", image_config)
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
    write_json_atomic(folder / COMPLETE, {"stage_index": trainer_state["stage_index"], "stage": trainer_state["stage"],
                                          "step": trainer_state["step"], "world_size": trainer_state["world_size"]})


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))


def list_complete(root: Path) -> list[CheckpointRef]:
    """Complete checkpoints under `root`, oldest first (by stage, then step)."""
    refs = []
    if root.is_dir():
        for folder in root.iterdir():
            mark = folder / COMPLETE
            if mark.is_file():
                info = json.loads(mark.read_text(encoding="utf-8"))
                refs.append(CheckpointRef(folder, int(info["stage_index"]), info["stage"], int(info["step"])))
    return sorted(refs, key=lambda r: (r.stage_index, r.step))


def latest_complete(root: Path) -> CheckpointRef | None:
    refs = list_complete(root)
    return refs[-1] if refs else None


def clear_mark(folder: Path) -> None:
    """Before writing into a folder that may already hold a checkpoint: it stops counting until marked again."""
    (folder / COMPLETE).unlink(missing_ok=True)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints (0: keep all); remove older ones and, when pruning, the
    leftovers of interrupted saves (folders without `complete.json`). The newest complete one is never removed.
    Call only between saves (rank 0, after the mark)."""
    if keep_last <= 0 or not root.is_dir():
        return []
    complete = list_complete(root)
    if not complete:
        return []
    keep = {ref.path for ref in complete[-keep_last:]} | {complete[-1].path}
    removed = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
