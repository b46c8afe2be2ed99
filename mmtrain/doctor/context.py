"""What several checks share, computed once and only when asked for: the tokenizer, the model config, a weightless
(meta-device) model, the stages' shard lists. A failure is stored, not raised, so the check that owns it reports it
and the checks that depend on it say they could not run instead of crashing the table."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer

from mmtrain.config import Recipe, StageSpec
from mmtrain.data.loader.shard_plan import load_shards
from mmtrain.data.loader.tokenizer import load_tokenizer
from mmtrain.data.remote_files import FetchOptions
from mmtrain.errors import UserError
from mmtrain.model import VisionLanguageModel, apply_stage_policy
from mmtrain.train.stage_model import model_config

class Unavailable(Exception):
    """A shared input that could not be built; the message says why (its own row reports the cause)."""


@dataclass
class Context:
    """One doctor run's inputs and lazily built, cached shared values."""

    recipe: Recipe
    world_size: int
    device_type: str
    precision: str
    out: Path
    build_ops: bool = False
    _cache: dict[str, Any] = field(default_factory=dict)

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = ("ok", build())
            except Exception as exc:  # noqa: BLE001 — stored and reported by the owning check
                self._cache[key] = ("error", exc)
        kind, value = self._cache[key]
        if kind == "error":
            raise Unavailable(str(value)) from value
        return value

    # ---- tokenizer -------------------------------------------------------------------------------------------------
    def raw_tokenizer(self) -> Any:
        """The tokenizer exactly as saved (to see which special tokens it really has)."""
        def build() -> Any:
            if not self.recipe.tokenizer:
                raise UserError("the recipe names no tokenizer (tokenizer: DIR)")
            if not Path(self.recipe.tokenizer).is_dir():
                raise UserError(f"tokenizer directory {self.recipe.tokenizer} does not exist")
            return AutoTokenizer.from_pretrained(self.recipe.tokenizer)
        return self._get("raw_tokenizer", build)

    def tokenizer(self) -> Any:
        """The tokenizer as the trainer uses it (load_tokenizer adds a missing `<image>` / pad)."""
        def build() -> Any:
            self.raw_tokenizer()  # same errors, reported once
            return load_tokenizer(self.recipe.tokenizer)
        return self._get("tokenizer", build)

    # ---- model -----------------------------------------------------------------------------------------------------
    def model_config(self) -> Any:
        """The trainer's VLMConfig (train/stage_model.model_config: preset + overrides + tokenizer ids)."""
        def build() -> Any:
            try:
                tok = self.tokenizer()
            except Unavailable as exc:
                raise Unavailable(f"needs the tokenizer ({exc})") from None
            try:
                return model_config(self.recipe, tok)
            except (UserError, ValueError, TypeError, KeyError, OSError) as exc:
                raise Unavailable(f"model config: {exc}") from None
        return self._get("model_config", build)

    def meta_model(self) -> Any:
        """The model built on the meta device: shapes and parameter counts, no weights, no memory."""
        def build() -> Any:
            config = self.model_config()
            with torch.device("meta"):
                return VisionLanguageModel.from_config(config, pretrained=False)
        return self._get("meta_model", build)

    def trainable(self, index: int) -> dict[str, int]:
        """Stage `index`'s trainable parameters by part, from its freeze / LoRA policy applied to a meta copy."""
        def build() -> dict[str, int]:
            stage = self.recipe.stages[index]
            model = copy.deepcopy(self.meta_model())
            with torch.device("meta"):
                return apply_stage_policy(model, vision=stage.train.vision, connector=stage.train.connector,
                                          llm=stage.train.llm, lora_roles=stage.lora.roles, r=stage.lora.r,
                                          alpha=stage.lora.alpha, dropout=stage.lora.dropout)
        return self._get(f"trainable:{index}", build)

    # ---- data ------------------------------------------------------------------------------------------------------
    def shards(self, spec: str | list[str], fetch: FetchOptions | None = None) -> list[Any]:
        """The train split's shards of one data source (plan.load_shards: the loader's own manifest reader, a
        manifest named by URL read with the stage's `fetch` options)."""
        def build() -> list[Any]:
            try:
                return load_shards(spec, "train", fetch)
            except ValueError as exc:  # json.JSONDecodeError
                raise UserError(f"{spec}: manifest.json does not parse: {exc}") from None
            except KeyError as exc:
                raise UserError(f"{spec}: manifest.json lacks {exc}") from None
        return self._get(f"shards:{spec}", build)


def num_workers(stage: StageSpec) -> int:
    """Loader slots per rank for the stage: max(1, num_workers) (0 workers still makes one slot)."""
    return max(1, stage.loader.num_workers)


def fetch_options(stage: StageSpec) -> FetchOptions:
    """How the stage's loader fetches shards named by URL (its `shard_*` knobs, as LoaderConfig.fetch_options)."""
    loader = stage.loader
    return FetchOptions(loader.shard_cache, loader.shard_retries, loader.shard_backoff, loader.shard_timeout)


def stage_label(stage: StageSpec) -> str:
    return f"stage {stage.name!r}"
