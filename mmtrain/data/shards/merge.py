"""Merge shard sets built from disjoint parts of one catalog (e.g. a SLURM array job) into one shard set.

Each part is a folder `mmtrain shards build` wrote (tars + manifest.json + rejects.jsonl). The merged folder holds every
part's shards under new, unique names (`train-000000.tar`, … numbered across parts in the order given) as hard links
to the parts' files (or copies), one manifest with samples / images / products / tasks / rows / rejects summed, and
the parts' rejects concatenated (each line tagged with its part). Built aside and renamed into place when complete,
like the builder's output. The parts can be deleted afterwards.

Parts must agree on how they were built (seed, val fraction, image size, spec, tasks), so that the train / val split
by product is the one a single build would have made; since the builder draws each product's phrasings from an RNG
seeded by (seed, product id, task), the merged samples are the ones a single build of the whole catalog writes. A key
found in two parts (the same product in two parts of the catalog, or parts merged twice) fails the merge.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from mmtrain.data.shards.writer import MANIFEST, REJECTS, read_manifest, replace_dir
from mmtrain.errors import UserError

MODES = ("link", "copy")
# Manifest fields every part must share: they decide the split, the samples' text and the images' size.
MUST_AGREE = ("format", "version", "seed", "val_fraction", "test_fraction", "image_size")
MANIFEST_DEFAULTS: dict[str, Any] = {"test_fraction": 0.0}
"""Manifest fields a build writes only when set: absent reads as this value."""
SOURCE_MUST_AGREE = ("kind", "spec", "tasks", "per_task", "text_only", "format", "val_every_attribute",
                     "attribute_weights")
SOURCE_DEFAULTS: dict[str, Any] = {"val_every_attribute": False, "attribute_weights": {}}
"""Source fields newer than some manifests: absent reads as this value."""


def shard_keys(path: Path) -> list[str]:
    """Sample keys of one tar shard in order (member `<key>.json` / `<key>.N.jpg`: the key is before the first dot
    of the basename, as webdataset groups members). Reads tar headers only."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                key = base.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except (OSError, tarfile.TarError) as exc:
        raise UserError(f"{path}: cannot read tar shard: {exc}") from exc
    return keys


def _check_compatible(parts: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> None:
    first = manifests[0]
    for part, manifest in zip(parts[1:], manifests[1:]):
        for name in MUST_AGREE:
            if manifest.get(name, MANIFEST_DEFAULTS.get(name)) != first.get(name, MANIFEST_DEFAULTS.get(name)):
                raise UserError(f"{part}: {name} is {manifest.get(name)!r} but {parts[0]} has {first.get(name)!r}; "
                                "only parts built with the same options can be merged")
        source, first_source = manifest.get("source") or {}, first.get("source") or {}
        for name in SOURCE_MUST_AGREE:
            default = SOURCE_DEFAULTS.get(name)
            if source.get(name, default) != first_source.get(name, default):
                raise UserError(f"{part}: source {name} differs from {parts[0]}'s; only parts of one catalog built "
                                "with the same spec and tasks can be merged")


def _place(src: Path, dst: Path, mode: str) -> None:
    if mode == "link":
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed: copy instead
            shutil.copy2(src, dst)
    else:
        shutil.copy2(src, dst)


def merge_shard_sets(parts: Sequence[str | Path], out: str | Path, mode: str = "link",
                     overwrite: bool = False, check_keys: bool = True) -> dict[str, Any]:
    """Merge the shard sets in `parts` into `out`; returns the merged manifest.

    Raises UserError (naming the part and shard at fault) for a missing or foreign manifest, parts built with
    different options, a shard whose sample count disagrees with its manifest, or a key found twice.
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {mode!r}")
    parts = [Path(p).resolve() for p in parts]
    if not parts:
        raise UserError("nothing to merge: give at least one part folder")
    if len(set(parts)) != len(parts):
        raise UserError("a part folder is given twice")
    out = Path(out).resolve()
    if out in parts:
        raise UserError(f"--out {out} is one of the parts")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    manifests = [read_manifest(p) for p in parts]
    _check_compatible(parts, manifests)

    # Every key once: where it was seen first, to name both places when it comes again.
    seen: dict[str, str] = {}
    plan: list[tuple[Path, str, dict[str, Any]]] = []  # (source tar, split, its manifest entry)
    splits: dict[str, dict[str, Any]] = {}
    for part, manifest in zip(parts, manifests):
        for split, info in manifest["splits"].items():
            merged = splits.setdefault(split, {"samples": 0, "images": 0, "products": 0, "tasks": Counter(),
                                               "shards": []})
            merged["samples"] += int(info["samples"])
            merged["images"] += int(info["images"])
            merged["products"] += int(info.get("products", 0))
            merged["tasks"].update(info.get("tasks", {}))
            for shard in info["shards"]:
                path = part / shard["name"]
                if not path.is_file():
                    raise UserError(f"{part}: manifest names {shard['name']}, which is not there")
                if check_keys:
                    keys = shard_keys(path)
                    if len(keys) != int(shard["samples"]):
                        raise UserError(f"{path}: {len(keys)} samples, the manifest says {shard['samples']}")
                    where = f"{part.name}/{shard['name']}"
                    for key in keys:
                        if key in seen:
                            raise UserError(f"duplicate key {key!r}: in {seen[key]} and in {where} (are the parts "
                                            "disjoint sets of products? was a part given twice?)")
                        seen[key] = where
                plan.append((path, split, shard))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        numbers: Counter = Counter()
        for path, split, shard in plan:
            name = f"{split}-{numbers[split]:06d}.tar"
            numbers[split] += 1
            _place(path, tmp / name, mode)
            splits[split]["shards"].append({**shard, "name": name})
        rejects: Counter = Counter()
        with open(tmp / REJECTS, "w", encoding="utf-8") as fh:
            for part, manifest in zip(parts, manifests):
                rejects.update(manifest.get("rejects") or {})
                source = part / REJECTS
                if source.is_file():
                    for line in source.read_text(encoding="utf-8").splitlines():
                        if line.strip():
                            fh.write(json.dumps({**json.loads(line), "part": part.name}, ensure_ascii=False,
                                                sort_keys=True) + "\n")
        first = manifests[0]
        manifest = {
            **{k: v for k, v in first.items() if k not in ("splits", "rows", "rejects", "source")},
            "rows": sum(int(m.get("rows") or 0) for m in manifests),
            "rejects": dict(sorted(rejects.items())),
            "splits": {split: {**s, "tasks": dict(sorted(s["tasks"].items()))} for split, s in splits.items()},
            "source": {**(first.get("source") or {}),
                       "merged_from": [{"part": str(p), "catalog": (m.get("source") or {}).get("catalog"),
                                        "rows": m.get("rows")} for p, m in zip(parts, manifests)]},
        }
        if "catalog" in manifest["source"]:
            manifest["source"]["catalog"] = None  # one per part, listed in merged_from
        tmp_manifest = tmp / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                                encoding="utf-8")
        os.replace(tmp_manifest, tmp / MANIFEST)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
