"""A shard set's manifest as the table `shards build`, `shards merge` and `shards inspect` print."""

from __future__ import annotations

import sys
from typing import Any


def print_manifest(manifest: dict[str, Any], file=None) -> None:
    """Samples, products, images and tasks per split, then how the set was drawn."""
    file = file or sys.stdout  # looked up at call time: a default bound at import outlives a redirected stdout
    splits = manifest["splits"]
    tasks = sorted({t for s in splits.values() for t in s["tasks"]})
    header = ["split", "shards", "products", "samples", "images"] + tasks
    rows = [[name, len(s["shards"]), s.get("products", ""), s["samples"], s["images"]]
            + [s["tasks"].get(t, 0) for t in tasks] for name, s in splits.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)), file=file)
    print(f"rows read {manifest.get('rows')}, rejects {manifest.get('rejects') or 'none'}, seed {manifest.get('seed')}, "
          f"mmtrain {manifest.get('tool_version')}", file=file)
    source = manifest.get("source") or {}
    drawn = []  # the builder options that change what is asked, so a reader of the table knows how it was drawn
    if source.get("attribute_weights"):
        weights = ", ".join(f"{k} {v:g}" for k, v in source["attribute_weights"].items())
        drawn.append(f"attribute QA weights: {weights} (others 1)")
    if source.get("val_every_attribute"):
        drawn.append("val asks every attribute")
    if drawn:
        print("; ".join(drawn), file=file)
