"""The records of one split of a shard set, in shard order, read as the loader reads them (for `shards inspect`,
evaluation and baselines, which need whole records rather than batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mmtrain.data.loader.bad_samples import BadSample, check_sample, warn_skipped
from mmtrain.data.loader.tar_index import ShardReader
from mmtrain.data.shards.writer import read_manifest
from mmtrain.errors import UserError


def iter_shard_samples(folder: Path, split: str) -> Iterator[dict[str, Any]]:
    """Records of one split in shard order, read as the loader reads them: a bad sample (cut shard, broken json,
    images not matching the marks …) is skipped with the loader's one-line warning instead of a traceback."""
    manifest = read_manifest(folder)
    if split not in manifest["splits"]:
        raise UserError(f"{folder}: no split {split!r} (have {list(manifest['splits'])})")
    reader = ShardReader()
    try:
        for shard in manifest["splits"][split]["shards"]:
            url = str(folder / shard["name"])
            try:
                count = len(reader.index(url))
            except (OSError, ValueError) as exc:
                raise UserError(f"{url}: cannot read tar shard: {exc}") from exc
            for position in range(count):
                try:
                    raw = reader.read(url, position)
                    _, images = check_sample(raw)
                except BadSample as exc:
                    warn_skipped(exc)
                    continue
                yield {**raw["json"], "images": images}
    finally:
        reader.close()
