"""`mmtrain shards build --out URL`: a shard set built locally, then published to object storage, manifest last.

A reader takes a shard set to exist when its manifest.json does (the loader reads nothing else first), so the
manifest is uploaded after every shard and rejects file, and an overwrite removes the old manifest before the first
new shard goes up: a set whose upload stopped half-way has no manifest and is never read as valid (nor as a mix of
old and new shards). Uploads are retried as the loader's fetches are (mmtrain/data/remote_files.py).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mmtrain.data import remote_files
from mmtrain.data.remote_files import FetchError, FetchOptions
from mmtrain.errors import UserError

MANIFEST = "manifest.json"
WRITABLE = ("s3", "s3a", "gs", "gcs", "az", "abfs", "file", "memory")
"""Protocols a shard set may be published to (an HTTP server is read-only here)."""


def check_target(url: str, overwrite: bool, fetch: FetchOptions) -> None:
    """Refuse before building: a protocol that cannot take uploads, or a set already published (unless `overwrite`)."""
    protocol = url.split("://", 1)[0].lower()
    if protocol not in WRITABLE:
        raise UserError(f"--out {url}: cannot upload over {protocol}:// (use a local folder or object storage: "
                        f"{', '.join(p + '://' for p in WRITABLE[:4])} …)")
    manifest = remote_files.join(url, MANIFEST)
    try:
        found = remote_files.exists(manifest, fetch)
    except FetchError as exc:
        raise UserError(f"--out {url}: cannot check for an existing shard set: {exc.detail}") from exc
    if found and not overwrite:
        raise UserError(f"{manifest} already exists (pass --overwrite to replace the shard set)")


def publish(folder: Path, url: str, fetch: FetchOptions) -> None:
    """Upload every file of the built `folder` to `url`, the manifest last (any old manifest removed first)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    try:
        remote_files.remove(remote_files.join(url, MANIFEST), fetch)
        for path in files:
            remote_files.upload(path, remote_files.join(url, path.name), fetch)
        remote_files.upload(folder / MANIFEST, remote_files.join(url, MANIFEST), fetch)
    except FetchError as exc:
        raise UserError(f"uploading the shard set to {url} stopped: {exc} (the set has no manifest.json, so no "
                        "reader takes it; run the build again)") from exc


def build_remote(options: Any, build: Callable[[Any], Any]) -> Any:
    """`build(options with a local scratch out)` for BuildOptions whose `out` is a URL, then `publish` it there;
    returns the build's summary with `out` the URL. The target is checked before anything is built."""
    url, fetch = options.out, FetchOptions()
    check_target(url, options.overwrite, fetch)
    scratch = Path(tempfile.mkdtemp(prefix="mmtrain-build-"))
    try:
        summary = build(replace(options, out=scratch / "set"))
        publish(scratch / "set", url, fetch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return replace(summary, out=url)
