"""Sequence-length check: an image's slot run and the template's fixed tokens must fit each stage's max_length.

What is checked, per stage (slots = num_image_slots(model config), k = most images in one sample of its sources):
- FAIL when `need(k) > max_length`, where need(k) is the position of the first learned token + 1 of a sample with k
  images, empty user text and an empty answer, rendered by the real template (BOS, system line, role markers,
  k × slots, EOS). Such samples lose every label to truncation and are all dropped, whatever their text.
- WARN when some probed real samples render longer than max_length (their answers are cut, or with
  `loader.truncate: false` the samples are dropped), and when max_length exceeds the LLM's max_position_embeddings.
k comes from a probe (the first PROBE_SAMPLES samples of each source's first shard, counting `<image>` marks) and
the manifest's per-shard image counts (ceil(images / samples) is a lower bound on the most images in a sample).
A source named by URL is probed through the loader's fetch (the stage's `shard_*` options): its manifest is read and
only its first shard is fetched, into the shard cache when one is set (where the loader then finds it).
"""

from __future__ import annotations

import json
import math
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mmtrain.data import remote_files
from mmtrain.data.loader.image_token import IMAGE_TOKEN
from mmtrain.data.loader.shard_plan import Shard
from mmtrain.data.loader.templates import IGNORE_INDEX, Renderer, SampleDropped
from mmtrain.data.remote_files import FetchOptions
from mmtrain.doctor.context import Context, Unavailable, fetch_options, stage_label
from mmtrain.doctor.report import Check, row
from mmtrain.model import num_image_slots

PROBE_SAMPLES = 256
"""Samples read (JSON members only) from the first shard of each source."""
RENDER_SAMPLES = 64
"""Of those, how many are rendered to measure real lengths."""


@dataclass
class Probe:
    max_images: int = 0
    conversations: list[list[dict]] = field(default_factory=list)


def _folder_and_name(path: str) -> tuple[str, str]:
    """The shard set folder (local or URL) holding a shard, and the shard's file name."""
    if remote_files.is_url(path):
        return remote_files.parent(path), path.rstrip("/").rsplit("/", 1)[-1]
    return str(Path(path).parent), Path(path).name


def _manifest(folder: str, fetch: FetchOptions) -> dict:
    """The parsed manifest.json of a shard set folder, read over `fetch` when the folder is a URL."""
    if remote_files.is_url(folder):
        return json.loads(remote_files.read_bytes(remote_files.join(folder, "manifest.json"), fetch))
    return json.loads((Path(folder) / "manifest.json").read_bytes())


def _manifest_lower_bound(shards: list[Shard], fetch: FetchOptions) -> int:
    """ceil(images / samples) over the source's shards, from the manifest.json of each set they come from."""
    names: dict[str, set[str]] = {}
    for shard in shards:
        folder, name = _folder_and_name(shard.path)
        names.setdefault(folder, set()).add(name)
    bound = 0
    for folder, wanted in names.items():
        entries = _manifest(folder, fetch)["splits"]["train"]["shards"]
        bound = max([bound] + [math.ceil(s.get("images", 0) / s["samples"]) for s in entries
                               if s["name"] in wanted and s.get("samples")])
    return bound


@contextmanager
def local_copy(path: str, fetch: FetchOptions) -> Iterator[str]:
    """A local file holding shard `path`: the path itself, or for a URL the loader's fetch of it (kept in the shard
    cache when one is set, else in a scratch folder removed on exit)."""
    if not remote_files.is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mmtrain-doctor-") as scratch:
        yield remote_files.fetch(path, fetch, lambda: scratch)[0]


def probe_source(ctx: Context, spec: str | list[str], fetch: FetchOptions | None = None) -> Probe:
    """Most images per sample and a few conversations of one source (tar headers + small JSON members only)."""
    fetch = fetch if fetch is not None else FetchOptions()
    shards = ctx.shards(spec, fetch)
    probe = Probe(max_images=_manifest_lower_bound(shards, fetch))
    with local_copy(shards[0].path, fetch) as path, tarfile.open(path) as tf:
        for member in tf:
            if len(probe.conversations) >= PROBE_SAMPLES:
                break
            if not (member.isfile() and member.name.endswith(".json")):
                continue
            record = json.loads(tf.extractfile(member).read())  # type: ignore[union-attr]
            turns = record.get("conversation", [])
            marks = sum(t.get("content", "").count(IMAGE_TOKEN) for t in turns if t.get("role") == "user")
            probe.max_images = max(probe.max_images, marks)
            probe.conversations.append(turns)
    return probe


def needed_length(renderer, images: int) -> int:
    """Tokens up to and including the first learned one, for a sample with `images` images and no text."""
    conversation = [{"role": "user", "content": IMAGE_TOKEN * images}, {"role": "assistant", "content": ""}]
    labels = renderer.render(conversation).labels
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1


def check_sequence_length(ctx: Context) -> Check:
    """See the module docstring: FAIL when no sample with the most images can keep a label, WARN on truncation."""
    try:
        tok, config = ctx.tokenizer(), ctx.model_config()
        slots = num_image_slots(config)
        renderer = Renderer(tok, ctx.recipe.template, slots)
    except (Unavailable, ValueError) as exc:
        return Check("sequence length", "WARN", f"not checked: {exc}")
    positions = config.text_config.get("max_position_embeddings")
    problems: list[tuple[str, str]] = []
    too_short: dict[tuple[int, int, int], list[str]] = {}
    long: dict[str, list[str]] = {}
    probes: dict[str, Probe] = {}
    summary = []
    for stage in ctx.recipe.stages:
        where = f"{stage_label(stage)} max_length {stage.max_length}"
        images, lengths = 0, []
        for source in stage.data:
            key = str(source.shards)
            if key not in probes:
                try:
                    probes[key] = probe_source(ctx, source.shards, fetch_options(stage))
                except (Unavailable, OSError, ValueError, KeyError, tarfile.TarError):
                    continue  # the shards row reports unreadable data
            probe = probes[key]
            images = max(images, probe.max_images)
            for turns in probe.conversations[:RENDER_SAMPLES]:
                try:
                    lengths.append(len(renderer.render(turns)))
                except (SampleDropped, ValueError, KeyError, TypeError):
                    pass  # the loader drops and counts these; not a length question
        try:
            need = needed_length(renderer, images)
        except (SampleDropped, ValueError) as exc:  # a chat template that refuses the probe: the tokenizer row says why
            return Check("sequence length", "WARN", f"not checked: the template cannot render a probe sample ({exc})")
        if need > stage.max_length:
            too_short.setdefault((need, images, stage.max_length), []).append(stage_label(stage))
        over = [n for n in lengths if n > stage.max_length]
        if over:
            fate = "truncated (answers cut)" if stage.loader.truncate else "dropped"
            long.setdefault(fate, []).append(f"{stage.name} {len(over)}/{len(lengths)} (up to {max(over)})")
        if positions is not None and stage.max_length > int(positions):
            problems.append(("WARN", f"{where} > the LLM's max_position_embeddings {positions}"))
        summary.append(f"{stage.name} {need}/{stage.max_length}")
    for (need, images, max_length), stages in too_short.items():
        problems.append(("FAIL", f"{', '.join(stages)}: max_length {max_length} < {need} tokens that a {images}-image "
                                 f"sample needs before its first learned token ({images} × {slots} slots + "
                                 f"{need - images * slots} template tokens): every such sample is dropped; raise "
                                 f"max_length to ≥ {need} or use a connector with fewer slots"))
    for fate, counts in long.items():
        problems.append(("WARN", f"probed samples longer than max_length will be {fate}: {', '.join(counts)}"))
    ok = f"{slots} slots per image; tokens needed before the first label / max_length: {', '.join(summary)}"
    return row("sequence length", problems, ok)
