"""Random access into webdataset tar shards: index the members once (headers only), then read sample i directly.

webdataset's `tarfile_to_samples` reads a shard front to back, so resuming at sample 900 of a shard would read and
throw away 900 samples. Here a shard is indexed by walking its tar headers (plain ustar headers are parsed directly;
anything else, e.g. GNU long names or pax headers, goes through `tarfile`), members are grouped into samples with
webdataset's own key rule (`base_plus_ext`, extensions lower-cased, a repeated extension is an error, as in
`group_by_keys`), and a sample is read with one `pread` (its members are contiguous in the tar). Only the `json`
member is decoded (`json.loads`, as webdataset's json handler); images stay bytes. No pickle handlers.

Speed (per sample, 2 members): the header walk reads the file in 64 KiB chunks and parses the headers found in each
(one syscall per ~8 samples instead of a seek and a read per header; once members average over 16 KiB it reads each
header alone, so large images are never read by the walk), members are tuples, and a json member that is
plainly UTF-8 skips `json.loads`' encoding sniffing; together ~4 µs, where a seek and a read per header took ~9 µs.

A shard named by a URL (`s3://`, `gs://`, `https://` …) is fetched whole into a local file first
(mmtrain/data/remote_files.py) and then read the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from typing import BinaryIO, Iterator, NamedTuple

from webdataset.tariterators import base_plus_ext

from mmtrain.data import remote_files
from mmtrain.data.loader.bad_samples import BadSample
from mmtrain.data.remote_files import FetchError, FetchOptions

BLOCK = 512
CHUNK = 1 << 16
"""Bytes read at once by the header walk: the headers of several small members come in one read."""


class Member(NamedTuple):
    name: str
    offset: int
    size: int


def _is_end(block: bytes) -> bool:
    """A whole zero block: where a tar archive ends (a cut file ends anywhere else)."""
    return len(block) == BLOCK and block.count(0) == BLOCK


def _ustar_walk(f: BinaryIO) -> tuple[list[Member], bool] | None:
    """Regular-file members of a plain ustar/GNU archive without extended headers and whether the archive ends with
    its end-of-archive block (False: the file was cut), or None to fall back to `tarfile`."""
    members = []
    pos = 0
    buf, start = b"", 0  # buf holds the file's bytes [start, start + len(buf)); a short read only at its end
    while True:
        if pos + BLOCK > start + len(buf):
            f.seek(pos)
            buf, start = f.read(_walk_read_size(pos, len(members))), pos
        header = buf[pos - start:pos - start + BLOCK]
        if len(header) < BLOCK or (header[0] == 0 and header.count(0) == BLOCK):
            return members, _is_end(header)
        kind = header[156:157]
        if kind not in (b"0", b"\0") or header[124] & 0x80:  # links, dirs, pax/GNU headers, base-256 sizes
            return None
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        members.append(Member(name.decode("utf-8", "surrogateescape"), pos + BLOCK, size))
        pos += BLOCK + -(-size // BLOCK) * BLOCK


def _walk_read_size(pos: int, members: int) -> int:
    """Bytes to read at the next header: a chunk while members are small (it holds the next few headers), the header
    alone once they average over a quarter chunk (a chunk would hold one header and bytes the walk never uses: with
    100 KB images the walk read two thirds of the shard)."""
    return CHUNK if members == 0 or pos // members <= CHUNK // 4 else BLOCK


def _ustar_members(f: BinaryIO) -> Iterator[Member] | None:
    walk = _ustar_walk(f)
    return None if walk is None else iter(walk[0])


def _tarfile_walk(path: str) -> tuple[list[Member], bool]:
    """The fallback walk (GNU long names, pax headers): members and whether the archive ends properly. `tarfile`
    stops quietly at a cut header and raises ReadError past a cut member; both mean a cut file, not a crash."""
    members = []
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for info in tf:
                    if info.isfile():
                        members.append(Member(info.name, info.offset_data, info.size))
                stop = tf.offset
        except tarfile.ReadError:
            return members, False
        f.seek(stop)
        return members, _is_end(f.read(BLOCK))


def _tarfile_members(path: str) -> Iterator[Member]:
    return iter(_tarfile_walk(path)[0])


def split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's `base_plus_ext` (key = up to the first dot of the last path part, ext = the rest), without its
    regex for the usual name (no newline, the last part has a dot after at least one character): the regex's greedy
    match is exactly this there. Anything else goes to `base_plus_ext` itself. Tested equal on odd names."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot > slash and "\n" not in name:
        return name[:dot], name[dot + 1:]
    return base_plus_ext(name)


class ShardIndex:
    """The samples of one tar shard, in file order: key and its members as (extension, data offset, size).

    `cut` is True when the file ends before its end-of-archive block (a copy or download cut short): the samples
    after the cut are lost, and so is the last one indexed, which may be missing members or bytes. `local` is the
    file to read when `path` (the name errors give) is a URL fetched into a local copy."""

    def __init__(self, path: str, local: str | None = None):
        self.path = path
        local = path if local is None else local
        self.samples: list[tuple[str, list[tuple[str, int, int]]]] = []
        with open(local, "rb") as f:
            walk = _ustar_walk(f)
        members, complete = walk if walk is not None else _tarfile_walk(local)
        self.cut = not complete
        samples, last, group = self.samples, None, []
        for name, offset, size in members:
            key, ext = split_name(name)
            if key is None:
                continue
            ext = ext.lower()
            if key != last:
                group = [(ext, offset, size)]
                samples.append((key, group))
                last = key
                continue
            for e, _, _ in group:
                if e == ext:
                    raise ValueError(f"{path}: sample {key}: duplicate member {name}")
            group.append((ext, offset, size))

    def __len__(self) -> int:
        return len(self.samples)


class ShardReader:
    """Reads samples by position from a few recently used shards (open files and indexes kept in an LRU).

    A shard path may be a URL (remote_files.py): the shard is fetched whole into a local file (the cache directory
    of `fetch`, or a private scratch file unlinked as soon as it is open, so an evicted or closed shard frees its
    disk) and read like a local one. A URL that cannot be fetched after the retries is remembered: every sample read
    from it raises BadSample `unreachable_shard` at once, without fetching again."""

    def __init__(self, max_open: int = 4, fetch: FetchOptions | None = None):
        self.max_open = max_open
        self.fetch = fetch if fetch is not None else FetchOptions()
        self._open: OrderedDict[str, tuple[ShardIndex, BinaryIO]] = OrderedDict()
        self._last: str | None = None  # the most recently used path (already at the LRU's end)
        self._failed: dict[str, FetchError] = {}
        self._scratch: str | None = None

    def index(self, path: str) -> ShardIndex:
        """The shard's index (a URL that cannot be fetched: FetchError, an OSError naming it)."""
        return self._get(path)[0]

    def _scratch_dir(self) -> str:
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="mmtrain-shards-")
        return self._scratch

    def _load(self, path: str) -> tuple[ShardIndex, BinaryIO]:
        """Index and open one shard, fetching it first when `path` is a URL."""
        if not remote_files.is_url(path):
            return ShardIndex(path), open(path, "rb")
        if path in self._failed:
            raise self._failed[path]
        try:
            local, private = remote_files.fetch(path, self.fetch, self._scratch_dir)
        except FetchError as exc:
            self._failed[path] = exc
            raise
        try:
            return ShardIndex(path, local), open(local, "rb")
        finally:
            if private:  # the open file keeps its bytes; the disk space goes when it is closed
                os.unlink(local)

    def _get(self, path: str) -> tuple[ShardIndex, BinaryIO]:
        if path == self._last:  # the usual case: the same shard as the sample before
            return self._open[path]
        if path in self._open:
            self._open.move_to_end(path)
        else:
            self._open[path] = self._load(path)
            while len(self._open) > self.max_open:
                _, (_, f) = self._open.popitem(last=False)
                f.close()
        self._last = path
        return self._open[path]

    def read(self, path: str, position: int) -> dict:
        """Sample `position` of shard `path` as a webdataset sample dict: `__key__`, `__url__`, `json` (decoded),
        `0.jpg` … (bytes). Member names are data (keys), never paths: nothing here writes a file.

        Raises BadSample (`truncated_shard`, `bad_json`) for a sample lost to a cut file or with a broken json, and
        (`unreachable_shard`) for every sample of a URL that cannot be fetched (remote_files.py); a
        position past the end of a whole (not cut) archive is a shard set out of step with its manifest: ValueError.
        """
        try:
            index, f = self._get(path)
        except FetchError as exc:
            raise BadSample(path, f"#{position}", "unreachable_shard", exc.detail) from exc
        whole = len(index) - 1 if index.cut else len(index)  # samples that are certainly complete
        if not 0 <= position < whole:
            if position < 0 or not index.cut:
                raise ValueError(f"{path}: has {len(index)} samples, fewer than its manifest entry says (asked for "
                                 f"sample {position}); rebuild the shard set")
            key = index.samples[position][0] if position < len(index) else f"#{position}"
            raise BadSample(path, key, "truncated_shard", f"the file is cut short after {whole} whole samples; "
                            f"sample {position} of the manifest is lost")
        key, members = index.samples[position]
        first = members[0][1]
        want = members[-1][1] + members[-1][2] - first
        span = _pread(f, want, first)
        if len(span) < want:  # the file shrank after it was indexed: never hand on short bytes
            raise BadSample(path, key, "truncated_shard", f"{want - len(span)} bytes missing at the end of the file")
        sample: dict = {"__key__": key, "__url__": path}
        for ext, offset, size in members:
            sample[ext] = span[offset - first:offset - first + size]
        if "json" in sample:
            try:
                sample["json"] = loads_json(sample["json"])
            except Exception as exc:  # JSONDecodeError, UnicodeDecodeError, RecursionError
                raise BadSample(path, key, "bad_json", f"cannot decode json: {exc}") from exc
        return sample

    def close(self) -> None:
        for _, f in self._open.values():
            f.close()
        self._open.clear()
        self._last = None
        self._failed.clear()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _pread(f: BinaryIO, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` in one call (fewer where the file ends)."""
    if hasattr(os, "pread"):
        out = os.pread(f.fileno(), size, offset)
        while 0 < len(out) < size:  # a short read before the end (signals, network file systems)
            more = os.pread(f.fileno(), size - len(out), offset + len(out))
            if not more:
                break
            out += more
        return out
    f.seek(offset)
    return f.read(size)


_decoder = json.JSONDecoder()


def loads_json(data: bytes) -> object:
    """`json.loads(data)`, minus its encoding sniffing when `data` plainly is UTF-8 (starts with `{` and no NUL
    after it): then `json.loads` would decode it as UTF-8 ('surrogatepass') and parse it with the default decoder,
    which is exactly what this does. Anything else (BOMs, UTF-16/32) goes to `json.loads` itself."""
    if data[:1] == b"{" and data[1:2] != b"\0":
        return _decoder.decode(data.decode("utf-8", "surrogatepass"))
    return json.loads(data)
