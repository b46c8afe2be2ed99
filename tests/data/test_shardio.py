"""Shard reading: the direct ustar header walk and the tarfile fallback index the same samples, and a sample reads
back exactly as webdataset's own tar reader groups it."""

import io
import json

import webdataset as wds

from mmtrain.data.loader.tar_index import ShardReader, _tarfile_members, _ustar_members
from mmtrain.data.shards.tar_members import end_of_archive, tar_member


def write_ustar(path, samples):
    out = b"".join(tar_member(f"{key}.{ext}", data) for key, members in samples for ext, data in members)
    path.write_bytes(out + end_of_archive(len(out)))


def test_ustar_walk_equals_tarfile_and_webdataset(tmp_path):
    long_key = "x" * 120  # too long for ustar: the builder writes a GNU header, so the fallback takes over
    samples = [("a1", [("json", b'{"n": 1}'), ("0.jpg", b"\xff" * 700)]),
               ("b2", [("json", b'{"n": 2}'), ("0.jpg", b"1" * 512), ("1.JPG", b"2" * 3)])]
    plain = tmp_path / "plain.tar"
    write_ustar(plain, samples)
    with open(plain, "rb") as f:
        fast = list(_ustar_members(f))
    assert fast == list(_tarfile_members(str(plain))) and len(fast) == 5
    gnu = tmp_path / "gnu.tar"
    write_ustar(gnu, samples + [(long_key, [("json", b'{"n": 3}')])])
    with open(gnu, "rb") as f:
        assert _ustar_members(f) is None
    reader = ShardReader()
    for path, n in ((plain, 2), (gnu, 3)):
        theirs = list(wds.WebDataset(str(path), shardshuffle=False))
        mine = [reader.read(str(path), i) for i in range(len(reader.index(str(path))))]
        assert len(mine) == len(theirs) == n
        for m, t in zip(mine, theirs):
            assert m["__key__"] == t["__key__"] and m["json"] == json.loads(t["json"])
            assert {k: v for k, v in m.items() if k != "json"} == {k: v for k, v in t.items()
                                                                  if k not in ("json", "__local_path__")}
    assert reader.read(str(plain), 1)["1.jpg"] == b"222"  # extensions lower-cased, as group_by_keys does
    reader.close()


class CountingFile(io.FileIO):
    """A raw file that counts the bytes read from it."""

    read_bytes = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        CountingFile.read_bytes += n or 0
        return n


def test_the_walk_reads_headers_not_large_members(tmp_path):
    """Samples of a small json and a 100 KB image: the walk finds what tarfile finds and reads under an eighth of the
    shard (a 64 KiB chunk at every header read two thirds of it)."""
    samples = [(f"k{i:03d}", [("json", b'{"n": %d}' % i), ("0.jpg", bytes([i]) * 100_000)]) for i in range(40)]
    path = tmp_path / "big.tar"
    write_ustar(path, samples)
    CountingFile.read_bytes = 0
    with io.BufferedReader(CountingFile(str(path))) as f:
        members = list(_ustar_members(f))
    assert members == list(_tarfile_members(str(path))) and len(members) == 80
    assert CountingFile.read_bytes < path.stat().st_size // 8
    reader = ShardReader()
    assert reader.read(str(path), 11)["0.jpg"] == bytes([11]) * 100_000 and reader.read(str(path), 0)["json"] == {"n": 0}
    reader.close()
