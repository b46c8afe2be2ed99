"""The doctor on shard sets served over HTTP (Python's http.server in a thread, the tiny sets copied under it): the
rows equal the local sets' rows, each shard is sized by one HEAD and only each set's first shard is fetched (into the
stage's `shard_cache`); a shard answering 404 or 500 and a manifest nobody serves fail the shards row, naming the
URL, after the stage's retries."""

from __future__ import annotations

import functools
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from doctor_helpers import tiny_recipe
from mmtrain.config import recipe_from_dict
from mmtrain.data.remote_files import cache_name
from mmtrain.doctor import Check, failures, format_table, run_checks

FAST = {"shard_retries": 1, "shard_backoff": 0.01, "shard_timeout": 10.0}
"""Fetch knobs of the remote recipes: two tries, 10 ms apart."""


class Handler(SimpleHTTPRequestHandler):
    """Serves its folder, logs (method, path), and answers 500 for the paths in the server's `broken` set."""

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, method) -> None:
        self.server.log.append((self.command, self.path))
        if self.path in self.server.broken:
            self.send_error(500, "planted failure")
        else:
            method(self)

    def do_GET(self) -> None:
        self._answer(SimpleHTTPRequestHandler.do_GET)

    def do_HEAD(self) -> None:
        self._answer(SimpleHTTPRequestHandler.do_HEAD)


@pytest.fixture
def served(tmp_path: Path, doctor_data: dict[str, Path]):
    """A copy of the tiny `mm` and `text` sets under tmp_path/www, served at the returned server's address."""
    for kind in ("mm", "text"):
        shutil.copytree(doctor_data[kind], tmp_path / "www" / kind)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "www")))
    server.log, server.broken, server.daemon_threads = [], set(), True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def base(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def remote_recipe(doctor_data: dict[str, Path], root: str, cache: Path) -> dict:
    """The tiny recipe with every source's shards under the URL `root` and the fast fetch knobs on every stage."""
    raw = tiny_recipe(doctor_data)
    for stage in raw["stages"]:
        for source in stage["data"]:
            source["shards"] = f"{root}/{Path(source['shards']).name}"
        stage.setdefault("loader", {}).update(FAST, shard_cache=str(cache))
    return raw


def rows(raw: dict, tmp_path: Path) -> dict[str, Check]:
    return {c.name: c for c in run_checks(recipe_from_dict(raw), 2, out=tmp_path / "run", device_type="cpu")}


def shards_failure(checks: dict[str, Check]) -> str:
    """The detail of the one FAIL row, which must be the shards row."""
    failed = failures(list(checks.values()))
    assert [c.name for c in failed] == ["shards"], format_table(list(checks.values()))
    return failed[0].detail


def test_remote_sets_give_the_local_rows_sizing_every_shard_and_fetching_one(doctor_data, served, tmp_path):
    local = rows(tiny_recipe(doctor_data), tmp_path)
    cache = tmp_path / "cache"
    remote = rows(remote_recipe(doctor_data, base(served), cache), tmp_path)
    same = [name for name in local if name != "disk space"]  # free bytes move between the two runs
    assert [(n, remote[n].status, remote[n].detail) for n in same] == [(n, local[n].status, local[n].detail)
                                                                       for n in same]
    assert not failures(list(remote.values())) and "8 train shard(s)" in remote["shards"].detail
    tars = sorted(f"/{kind}/{p.name}" for kind in ("mm", "text") for p in doctor_data[kind].glob("train-*.tar"))
    firsts = ["/mm/train-000000.tar", "/text/train-000000.tar"]
    assert len(tars) == 8 and set(firsts) <= set(tars)
    heads = sorted(path for method, path in served.log if method == "HEAD")
    gets = sorted(path for method, path in served.log if method == "GET")
    assert heads == sorted(tars + firsts)  # every shard's size, then the probed shard's size check after its fetch
    assert gets == ["/mm/manifest.json", "/mm/manifest.json", "/mm/train-000000.tar",
                    "/text/manifest.json", "/text/manifest.json", "/text/train-000000.tar"]  # list, image counts, probe
    assert sorted(p.name for p in cache.iterdir()) == sorted(cache_name(base(served) + p) for p in firsts)


def test_a_missing_or_failing_shard_fails_the_shards_row_naming_its_url(doctor_data, served, tmp_path):
    (tmp_path / "www" / "mm" / "train-000001.tar").unlink()
    served.broken.add("/mm/train-000002.tar")
    detail = shards_failure(rows(remote_recipe(doctor_data, base(served), tmp_path / "cache"), tmp_path))
    url = f"{base(served)}/mm"
    assert detail == (f"stage 'pretrain': {url}: {url}/train-000001.tar is missing; {url}/train-000002.tar is "
                      f"unreachable: failed after 2 tries, last: FileNotFoundError: {url}/train-000002.tar; rebuild "
                      "or re-copy the shard set")
    assert [m for m, p in served.log if p == "/mm/train-000002.tar"] == ["HEAD", "GET"] * 2  # 2 tries: HEAD, GET


def test_an_unreachable_manifest_fails_the_shards_row_naming_its_url(doctor_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nobody listens once the socket is closed
    detail = shards_failure(rows(remote_recipe(doctor_data, dead, tmp_path / "cache"), tmp_path))
    for stage, kind in (("lm", "text"), ("pretrain", "mm")):
        assert (f"stage '{stage}': cannot read {dead}/{kind}/manifest.json: failed after 2 tries, last: "
                "ClientConnectorError") in detail
