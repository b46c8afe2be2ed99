"""Corrupting built shards in tests, as if they went bad after the build: read a tar's samples, rewrite them."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image
from webdataset.tariterators import base_plus_ext

from mmtrain.data.shards.tar_members import end_of_archive, tar_member


def png_header(width: int, height: int) -> bytes:
    """A 40-byte PNG whose header declares width × height (a decompression bomb is cheap to make)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def white_jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (255, 255, 255)).save(buf, format="JPEG")
    return buf.getvalue()


def read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = base_plus_ext(m.name)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def write_samples(path: Path, samples: list[tuple[str, dict[str, bytes]]], cut: int | None = None) -> None:
    """Rewrite a shard as the builder lays it out (ustar, images then json); `cut`: keep only that many bytes."""
    out = b"".join(tar_member(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items())
    out += end_of_archive(len(out))
    path.write_bytes(out[:cut] if cut is not None else out)


def conv(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def with_conv(sample: dict[str, bytes], conversation: list[dict]) -> bytes:
    return json.dumps({**conv(sample), "conversation": conversation}).encode()
