"""Random access into webdataset tar shards: index the members once (headers only), then read sample i directly.

webdataset's `tarfile_to_samples` reads a shard front to back, so resuming at sample 900 of a shard would read and
throw away 900 samples. Here a shard is indexed by walking its tar headers (plain ustar headers are parsed directly;
anything else, e.g. GNU long names or pax headers, goes through `tarfile`), members are grouped into samples with
webdataset's own key rule (`base_plus_ext`, extensions lower-cased, a repeated extension is an error, as in
`group_by_keys`), and a sample is read with one seek and one read (its members are contiguous in the tar). Only the
`json` member is decoded (`json.loads`, as webdataset's json handler); images stay bytes. No pickle handlers.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from webdataset.tariterators import base_plus_ext

BLOCK = 512


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int


def _ustar_members(f: BinaryIO) -> Iterator[Member] | None:
    """Regular-file members of a plain ustar/GNU archive without extended headers, or None to fall back."""
    members = []
    pos = 0
    while True:
        f.seek(pos)
        header = f.read(BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:
            return iter(members)
        kind = header[156:157]
        if kind not in (b"0", b"\0") or header[124] & 0x80:  # links, dirs, pax/GNU headers, base-256 sizes
            return None
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        members.append(Member(name.decode("utf-8", "surrogateescape"), pos + BLOCK, size))
        pos += BLOCK + -(-size // BLOCK) * BLOCK


def _tarfile_members(path: str) -> Iterator[Member]:
    with tarfile.open(path, mode="r:") as tf:
        for info in tf:
            if info.isfile():
                yield Member(info.name, info.offset_data, info.size)


class ShardIndex:
    """The samples of one tar shard, in file order: key and its members as (extension, data offset, size)."""

    def __init__(self, path: str):
        self.path = path
        self.samples: list[tuple[str, list[tuple[str, int, int]]]] = []
        with open(path, "rb") as f:
            members = _ustar_members(f)
        for m in members if members is not None else _tarfile_members(path):
            key, ext = base_plus_ext(m.name)
            if key is None:
                continue
            ext = ext.lower()
            if not self.samples or self.samples[-1][0] != key:
                self.samples.append((key, []))
            elif any(e == ext for e, _, _ in self.samples[-1][1]):
                raise ValueError(f"{path}: sample {key}: duplicate member {m.name}")
            self.samples[-1][1].append((ext, m.offset, m.size))

    def __len__(self) -> int:
        return len(self.samples)


class ShardReader:
    """Reads samples by position from a few recently used shards (open files and indexes kept in an LRU)."""

    def __init__(self, max_open: int = 4):
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[ShardIndex, BinaryIO]] = OrderedDict()

    def index(self, path: str) -> ShardIndex:
        return self._get(path)[0]

    def _get(self, path: str) -> tuple[ShardIndex, BinaryIO]:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        entry = (ShardIndex(path), open(path, "rb"))
        self._open[path] = entry
        while len(self._open) > self.max_open:
            _, (_, f) = self._open.popitem(last=False)
            f.close()
        return entry

    def read(self, path: str, position: int) -> dict:
        """Sample `position` of shard `path` as a webdataset sample dict: `__key__`, `__url__`, `json` (decoded),
        `0.jpg` … (bytes)."""
        index, f = self._get(path)
        if not 0 <= position < len(index):
            raise ValueError(f"{path}: has {len(index)} samples, fewer than its manifest entry says (asked for "
                             f"sample {position}); rebuild the shard set")
        key, members = index.samples[position]
        first = members[0][1]
        f.seek(first)
        span = f.read(members[-1][1] + members[-1][2] - first)
        sample: dict = {"__key__": key, "__url__": path}
        for ext, offset, size in members:
            sample[ext] = span[offset - first:offset - first + size]
        if "json" in sample:
            try:
                sample["json"] = json.loads(sample["json"])
            except Exception as exc:
                raise ValueError(f"{path}: sample {key}: cannot decode json: {exc}") from exc
        return sample

    def close(self) -> None:
        for _, f in self._open.values():
            f.close()
        self._open.clear()
