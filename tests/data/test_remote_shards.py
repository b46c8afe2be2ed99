"""Shard sets in object storage and over HTTP, read through real servers started here: a moto S3 server and Python's
http.server (plain, dropping connections, answering 500, or a proxy in front of S3 that refuses one upload).

The remote loader must give the local loader's batches in the same order (2 ranks × 2 workers), exact epochs and
exact resume; survive flaky servers; name a dead URL; count an unreachable shard's samples under `skip`; and a shard
set built to s3:// must round-trip, with a half upload leaving no manifest.
"""

from __future__ import annotations

import functools
import http.client
import importlib.util
import json
import shutil
import socket
import threading
import warnings
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from loader_fixtures import tiny_tokenizer, write_shard_set
from local_s3 import free_port, moto_s3
from test_stream import all_keys, assert_same_batches, config

from mmtrain.cli import main
from mmtrain.data.loader.bad_samples import BadSample, SkippedSampleWarning
from mmtrain.data.loader.shard_plan import load_shards
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.loader.tar_index import ShardReader
from mmtrain.data.remote_files import CACHE_ENV, FetchError, FetchOptions, cache_name
from mmtrain.errors import UserError

BUCKET = "mmtrain-test"
FAST = dict(shard_retries=3, shard_backoff=0.01, shard_timeout=10.0)


def run_ranks(cfg, world: int = 2) -> dict[int, list[dict]]:
    """One epoch on each simulated rank; the workers are stopped at once (not left to the garbage collector)."""
    out = {}
    for rank in range(world):
        loader = build_loader(cfg, tiny_tokenizer(), rank=rank, world_size=world)
        out[rank] = list(loader)
        loader.close()
    return out


class FileHandler(SimpleHTTPRequestHandler):
    """Serves the server's folder; `faults` (a server attribute) makes the first k requests of each file fail:
    `drop` sends the headers and half the body, then closes the connection; `500` answers 500."""

    def log_message(self, *args: object) -> None:
        pass

    def _fault(self) -> bool:
        server = self.server
        with server.lock:
            server.log.append((self.command, self.path))
            n = server.seen[self.path]
            server.seen[self.path] += 1
        kind, k = server.faults
        if n >= k:
            return False
        if kind == "500":
            self.send_error(500, "planted failure")
        else:
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        return True

    def do_GET(self) -> None:
        if not self._fault():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._fault():
            super().do_HEAD()


def serve(folder: Path, faults: tuple[str, int] = ("none", 0)) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FileHandler, directory=str(folder)))
    server.faults, server.seen, server.log, server.lock = faults, Counter(), [], threading.Lock()
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def url_of(server: ThreadingHTTPServer, path: str = "") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{path}"


def tar_requests(server: ThreadingHTTPServer, name: str) -> list[str]:
    return [method for method, path in server.log if path.endswith(name)]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return write_shard_set(tmp_path_factory.mktemp("remote") / "set", [7, 5, 9])  # 21 samples, 3 shards


@pytest.fixture(scope="module")
def http_root(local: Path):
    server = serve(local.parent)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def s3(local: Path):
    """A moto S3 server holding the local set at s3://BUCKET/set, reached through AWS_ENDPOINT_URL as botocore does."""
    with pytest.MonkeyPatch.context() as mp, moto_s3(mp, BUCKET, {"set": local}) as server:
        yield server


def test_s3_and_http_give_the_local_batches_in_the_same_order(local, http_root, s3):
    """2 ranks × 2 workers: token for token and pixel for pixel the local batches, each sample once per epoch."""
    expected = run_ranks(config(str(local)))
    for url in (f"s3://{BUCKET}/set", url_of(http_root, "set")):
        got = run_ranks(config(url, **FAST))
        for rank in (0, 1):
            assert_same_batches(got[rank], expected[rank])
        real = Counter(k for batches in got.values() for b in batches
                       for k, f in zip(b["keys"], b["filler"].tolist()) if not f)
        assert sorted(real) == sorted(all_keys(local)) and set(real.values()) == {1}


def test_brace_range_selects_shards_counted_by_the_manifest(local, http_root):
    base = url_of(http_root, "set")
    shards = load_shards(base + "/train-{000002,000000}.tar")
    assert [(s.path, s.samples) for s in shards] == [(base + "/train-000002.tar", 9), (base + "/train-000000.tar", 7)]
    batches = run_ranks(config(base + "/train-{000000..000001}.tar", num_workers=0, **FAST), world=1)[0]
    keys = [k for b in batches for k, f in zip(b["keys"], b["filler"].tolist()) if not f]
    assert sorted(keys) == sorted(all_keys(local)[:12])
    with pytest.raises(UserError, match=r"set/train-000003.tar: not a train shard of .*set/manifest.json"):
        load_shards(base + "/train-{000000..000003}.tar")


def test_resume_mid_epoch_over_http_with_a_cache_is_exact(local, http_root, tmp_path, monkeypatch):
    """The cursor taken after 3 batches resumes to the uninterrupted run's batches, over 2 epochs on 2 ranks; the
    cache (MMTRAIN_SHARD_CACHE) holds one file per shard, and a warm cache fetches no shard again (HEAD only)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    base = url_of(http_root, "set")
    cfg = config(base, shuffle_buffer=3, **FAST)
    tok = tiny_tokenizer()
    straight = {rank: build_loader(cfg, tok, rank=rank, world_size=2) for rank in (0, 1)}
    full = {rank: [b for _ in range(2) for b in loader] for rank, loader in straight.items()}
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == sorted(cache_name(f"{base}/train-{i:06d}.tar") for i in range(3))
    gets = len([m for m, p in http_root.log if m == "GET" and p.endswith(".tar")])
    for rank in (0, 1):
        first = build_loader(cfg, tok, rank=rank, world_size=2)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == 3:
                break
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = build_loader(cfg, tok, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert_same_batches(head + [b for _ in range(2) for b in resumed], full[rank])
        resumed.close()
        straight[rank].close()
    assert len([m for m, p in http_root.log if m == "GET" and p.endswith(".tar")]) == gets


@pytest.mark.parametrize("kind", ["drop", "500"])
def test_a_flaky_server_is_survived(local, kind):
    """The first 2 requests of every file fail (cut connection / HTTP 500): with 3 retries every sample arrives,
    byte for byte, and each shard was asked for exactly 2 failed + the good requests."""
    server = serve(local.parent, (kind, 2))
    try:
        remote, here = ShardReader(fetch=FetchOptions(retries=3, backoff=0.01)), ShardReader()
        for i, count in enumerate((7, 5, 9)):
            name = f"train-{i:06d}.tar"
            for position in range(count):
                got = remote.read(url_of(server, f"set/{name}"), position)
                want = here.read(str(local / name), position)
                assert got.pop("__url__") == url_of(server, f"set/{name}")
                want.pop("__url__")
                assert got == want
            assert tar_requests(server, name) == ["GET", "GET", "GET", "HEAD"]  # 2 failed, the body, its size
        remote.close()
        batches = run_ranks(config(url_of(server, "set"), **FAST))
        assert_same_batches(batches[0], run_ranks(config(str(local)))[0])
    finally:
        server.shutdown()


def test_a_dead_url_is_named_and_4xx_is_not_retried(local, http_root):
    missing = url_of(http_root, "set/train-000009.tar")
    with pytest.raises(FetchError, match=rf"{missing}: FileNotFoundError.*not retried"):
        ShardReader(fetch=FetchOptions(retries=3, backoff=0.01)).index(missing)
    assert tar_requests(http_root, "train-000009.tar") == ["GET"]
    closed = f"http://127.0.0.1:{free_port()}/set/train-000000.tar"
    with pytest.raises(FetchError, match=rf"{closed}: failed after 3 tries, last: ClientConnectorError"):
        ShardReader(fetch=FetchOptions(retries=2, backoff=0.01)).index(closed)
    with pytest.raises(UserError, match=rf"{url_of(http_root, 'nothing/manifest.json')}: no manifest.json"):
        load_shards(url_of(http_root, "nothing"))
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(UserError, match=r"gs://bkt/set/manifest.json: reading gs:// needs gcsfs: pip install"):
            load_shards("gs://bkt/set")


def test_an_unreachable_shard_raises_or_is_counted(local, tmp_path):
    """Shard 1 (5 samples) answers 404. `raise`: BadSample naming its URL. `skip`: each of its samples a slot reads is
    one warning and one `unreachable_shard` count; every other sample arrives once, both ranks take the same steps,
    and the URL is asked for once per reader, not once per sample."""
    shutil.copytree(local, tmp_path / "set")
    (tmp_path / "set" / "train-000001.tar").unlink()
    server = serve(tmp_path)
    dead = url_of(server, "set/train-000001.tar")
    try:
        cfg = config(url_of(server, "set"), num_workers=0, shuffle=False, **FAST)
        with pytest.raises(BadSample, match=rf"{dead}: sample #0: FileNotFoundError.*\(unreachable_shard\)"):
            list(build_loader(config(url_of(server, "set"), num_workers=0, shuffle=False, on_bad_sample="raise",
                                     **FAST), tiny_tokenizer(), rank=0, world_size=1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaders = [build_loader(cfg, tiny_tokenizer(), rank=r, world_size=2) for r in (0, 1)]
            batches = [list(loader) for loader in loaders]
        assert [len(b) for b in batches] == [6, 6]
        skips = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
        counted = sum(loader.dropped().get("unreachable_shard", 0) for loader in loaders)
        assert counted == len(skips) >= 5 and all(dead in s and "unreachable_shard" in s for s in skips)
        assert set(loaders[0].dropped()) | set(loaders[1].dropped()) == {"unreachable_shard"}
        real = Counter(k for bs in batches for b in bs for k, f in zip(b["keys"], b["filler"].tolist()) if not f)
        assert sorted(real) == sorted(k for k in all_keys(local) if not 7 <= int(k[1:].split("-")[0]) < 12)
        assert set(real.values()) == {1}
        assert len(tar_requests(server, "train-000001.tar")) == 3  # the raise run's, then once per rank's reader
    finally:
        server.shutdown()


class RefusingProxy(SimpleHTTPRequestHandler):
    """Forwards every request to the S3 server, except a PUT of the server's `refuse` name: 403. HTTP/1.1, so that
    a client's `Expect: 100-continue` is answered."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "PUT" and self.path.split("?")[0].endswith(self.server.refuse):
            self.send_response(403)
            message = b"<Error><Code>AccessDenied</Code><Message>planted refusal</Message></Error>"
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward


def _alpaca(path: Path, n: int) -> Path:
    path.write_text(json.dumps([{"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i}."}
                                for i in range(n)]))
    return path


def test_shards_build_out_s3_round_trips_and_a_half_upload_has_no_manifest(tmp_path, s3, monkeypatch, capsys):
    data = _alpaca(tmp_path / "alpaca.json", 40)
    args = ["shards", "build", "--format", "alpaca", "--input", str(data), "--shard-size", "10", "--no-progress",
            "--val-fraction", "0"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    assert main(args + ["--out", f"s3://{BUCKET}/built"]) == 0
    client = s3["client"]
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    listed = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="built/")["Contents"])
    assert listed == [f"built/{n}" for n in names]
    for name in names:
        if name.endswith(".tar"):
            assert client.get_object(Bucket=BUCKET, Key=f"built/{name}")["Body"].read() == \
                (tmp_path / "local" / name).read_bytes()
    assert [(Path(s.path).name, s.samples) for s in load_shards(f"s3://{BUCKET}/built")] == \
        [(Path(s.path).name, s.samples) for s in load_shards(tmp_path / "local")]
    capsys.readouterr()
    assert main(args + ["--out", f"s3://{BUCKET}/built"]) == 2
    assert f"s3://{BUCKET}/built/manifest.json already exists (pass --overwrite" in capsys.readouterr().err
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), RefusingProxy)
    proxy.upstream, proxy.refuse, proxy.daemon_threads = s3["port"], "train-000002.tar", True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        assert main(args + ["--out", f"s3://{BUCKET}/built", "--overwrite"]) == 2
    finally:
        proxy.shutdown()
        proxy.server_close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3['port']}")
    assert (f"uploading the shard set to s3://{BUCKET}/built stopped: s3://{BUCKET}/built/train-000002.tar: "
            "PermissionError") in capsys.readouterr().err
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="built/")["Contents"]}
    assert "built/manifest.json" not in keys and "built/train-000001.tar" in keys
    with pytest.raises(UserError, match="no manifest.json"):
        load_shards(f"s3://{BUCKET}/built")
