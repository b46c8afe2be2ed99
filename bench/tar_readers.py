"""Tar readers side by side on the same shards, in one run: webdataset's own reader and mmtrain's indexed reader on
local files, then mmtrain's reader and full loader over HTTP (a local threading http.server, so the network
costs only what a fast link costs: fetch + write + index, no latency).

- read rows: every sample of every shard, json decoded (webdataset: `wds.WebDataset(urls, shardshuffle=False)` and
  `json.loads`; mmtrain: `ShardReader.read` by position, the loader's access path, its header index built per run;
  over HTTP: each shard fetched into a scratch file first, no cache). Yardstick: webdataset on local files.
- stream rows: the full loader (tar read → decode → template → collate → hand-off, 1 worker, one epoch) on the local
  directory and on its URL, paired in each round. Yardstick: the local loader.

Each figure is the median over the rounds, the rows taking turns within a round (this VM's speed drifts).
`bench/loader.py` runs it at its end, on its own shard set (`--reader-rounds N`).
"""

from __future__ import annotations

import functools
import json
import statistics
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import webdataset as wds

from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.shard_plan import load_shards
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.loader.tar_index import ShardReader


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve(folder: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def read_webdataset(paths: list[str]) -> float:
    t = time.perf_counter()
    n = 0
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        json.loads(sample["json"])
        n += 1
    return n / (time.perf_counter() - t)


def read_mmtrain(paths: list[tuple[str, int]]) -> float:
    t = time.perf_counter()
    reader = ShardReader()
    n = 0
    for path, count in paths:
        for i in range(count):
            reader.read(path, i)
            n += 1
    reader.close()
    return n / (time.perf_counter() - t)


def stream(data: str, tok, batch_size: int) -> float:
    """Samples/s of one epoch of a fresh loader (1 worker), fork and fetch included."""
    cfg = LoaderConfig(data=data, num_image_slots=65, batch_size=batch_size, max_length=1024, num_workers=1,
                       image=ImageConfig(size=224), shuffle_buffer=100)
    loader = build_loader(cfg, tok, rank=0, world_size=1)
    t = time.perf_counter()
    n = sum(len(batch["keys"]) for batch in loader)
    loader.close()
    return n / (time.perf_counter() - t)


def compare(shards: Path, tok, rounds: int = 5, batch_size: int = 8) -> None:
    server = serve(shards.parent)
    url = f"http://127.0.0.1:{server.server_address[1]}/{shards.name}"
    try:
        local = [(s.path, s.samples) for s in load_shards(shards)]
        remote = [(s.path, s.samples) for s in load_shards(url)]
        rows = {"webdataset, local files": lambda: read_webdataset([p for p, _ in local]),
                "mmtrain ShardReader, local files": lambda: read_mmtrain(local),
                "webdataset, over HTTP (its curl pipe)": lambda: read_webdataset([p for p, _ in remote]),
                "mmtrain ShardReader, over HTTP (fetch + index)": lambda: read_mmtrain(remote),
                "mmtrain loader, local files": lambda: stream(str(shards), tok, batch_size),
                "mmtrain loader, over HTTP": lambda: stream(url, tok, batch_size)}
        rates: dict[str, list[float]] = {name: [] for name in rows}
        order = list(rows)
        for i in range(rounds):
            for name in (order if i % 2 == 0 else order[::-1]):
                rates[name].append(rows[name]())
    finally:
        server.shutdown()
    samples = sum(c for _, c in local)
    size = sum(Path(p).stat().st_size for p, _ in local) / 1e6
    print(f"tar readers: {samples} samples in {len(local)} shards, {size:.1f} MB; median of {rounds} rounds, rows "
          "taking turns")
    print(f"{'reader':<48}{'samples/s':>10}{'ratio':>8}  yardstick")
    yard = {"read": statistics.median(rates["webdataset, local files"]),
            "stream": statistics.median(rates["mmtrain loader, local files"])}
    for name, values in rates.items():
        kind = "stream" if "loader" in name else "read"
        mid = statistics.median(values)
        print(f"{name:<48}{mid:>10.1f}{mid / yard[kind]:>8.2f}  "
              f"{'webdataset, local files' if kind == 'read' else 'mmtrain loader, local files'}"
              f"  (rounds: {', '.join(f'{v:.0f}' for v in values)})")
