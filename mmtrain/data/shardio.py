"""Random access into webdataset tar shards: index the members once (headers only), then read sample i directly.

webdataset's `tarfile_to_samples` reads a shard front to back, so resuming at sample 900 of a shard would read and
throw away 900 samples. Here a shard is indexed by walking its tar headers (tarfile seeks over member data), and a
sample's members are read with one seek each. Members are grouped into samples with webdataset's own
`group_by_keys` (same key/extension rules as `tarfile_to_samples`) and JSON is decoded with its `Decoder`.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from webdataset import autodecode
from webdataset.tariterators import base_plus_ext, group_by_keys


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int


class ShardIndex:
    """The samples of one tar shard, in file order, as lists of members (name, data offset, size)."""

    def __init__(self, path: str):
        self.path = path
        self.samples: list[tuple[str, list[Member]]] = []
        with tarfile.open(path, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, _ = base_plus_ext(info.name)
                if key is None:
                    continue
                if not self.samples or self.samples[-1][0] != key:
                    self.samples.append((key, []))
                self.samples[-1][1].append(Member(info.name, info.offset_data, info.size))

    def __len__(self) -> int:
        return len(self.samples)


_json_decoder = autodecode.Decoder([autodecode.handle_extension("json", json.loads)], only=["json"])


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

        def files():
            for m in members:
                f.seek(m.offset)
                yield {"fname": m.name, "data": f.read(m.size), "__url__": path}

        samples = list(group_by_keys(files()))
        if len(samples) != 1:
            raise ValueError(f"{path}: sample {key} did not group into one sample")
        try:
            return _json_decoder(samples[0])
        except Exception as exc:
            raise ValueError(f"{path}: sample {key}: cannot decode json: {exc}") from exc

    def close(self) -> None:
        for _, f in self._open.values():
            f.close()
        self._open.clear()
