"""Tar members as bytes, built where the data is made (in the build workers), so the writer only appends them.

Why not `tarfile` / `webdataset.TarWriter` for every member: their per-member header code costs more than
re-encoding a small product photo, and it runs in the one parent process. Headers here are plain POSIX ustar with a
fixed owner, mode and mtime (byte-identical rebuilds); names too long for ustar fall back to `tarfile`'s GNU header.
Tests read every shard back with `tar -tf`, `tarfile` and `webdataset`.
"""

from __future__ import annotations

import tarfile

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor: archives end padded to a whole record
OWNER = b"mmtrain"


def _template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[136:148] = b"00000000000\0"  # mtime 0
    header[148:156] = b" " * 8          # the checksum field counts as spaces while summing
    header[156:157] = b"0"              # regular file
    header[257:265] = b"ustar\x0000"
    header[265:265 + len(OWNER)] = OWNER
    header[297:297 + len(OWNER)] = OWNER
    return header


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)


def _ustar_header(name: bytes, size: int) -> bytes:
    header = _TEMPLATE.copy()
    header[0:len(name)] = name
    size_field = b"%011o\0" % size
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(size_field))
    return bytes(header)


_ZEROS = memoryview(bytes(BLOCK))


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) of one regular-file member of `size` bytes."""
    raw = name.encode("utf-8")
    if len(raw) < 100:
        return _ustar_header(raw, size)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "mmtrain", "mmtrain"
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> memoryview:
    """The zeros after `size` bytes of member data, up to a whole block (a view: nothing is allocated)."""
    return _ZEROS[:-size % BLOCK]


def member_parts(name: str, data: bytes) -> tuple[bytes, bytes, memoryview]:
    """One member as header, data, padding: three buffers for `os.writev`, the data itself not copied."""
    return tar_header(name, len(data)), data, padding(len(data))


def tar_member(name: str, data: bytes) -> bytes:
    """Header + data + padding of one regular-file member."""
    return b"".join(member_parts(name, data))


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record, as tar itself ends an archive."""
    end = written + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end % RECORD))
