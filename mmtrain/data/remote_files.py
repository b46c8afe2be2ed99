"""Shard files in object storage or over HTTP: `s3://`, `gs://`, `https://` … fetched into local files through fsspec.

The loader reads a shard by position (a slot starts mid-shard, a resume seeks to a sample), which needs random access.
So a remote shard is fetched whole into a local file and then indexed and read exactly like a local one: into the
user's cache directory when one is set (kept across runs and processes, keyed by URL, written under a temporary name
and renamed into place, reused while its size matches the remote file's), else into a private scratch directory that
the reader empties as it goes. Shard builds upload through the same retries.

Every request is retried with exponential backoff on what may pass (timeouts, dropped connections, HTTP 5xx, 408 and
429), never on what will not (404, 403 and other 4xx: those fail at once), and a failure after the last try is a
`FetchError` naming the URL, the tries and the last cause. The storage libraries' own retries are turned off so that
`retries` means what it says. S3 endpoints and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_PROFILE` …) that botocore reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import fsspec

from mmtrain.errors import UserError

CACHE_ENV = "MMTRAIN_SHARD_CACHE"
"""Environment variable naming the shard cache directory when the loader's `shard_cache` is not set."""
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NEEDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs"}
"""Protocols whose fsspec implementation is a package of its own: the package to install."""
log = logging.getLogger(__name__)
T = TypeVar("T")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote file (`scheme://…`) rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def join(url: str, name: str) -> str:
    """`name` inside the URL directory `url`."""
    return url.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The URL directory holding `url`."""
    return url.rstrip("/").rsplit("/", 1)[0]


@dataclass(frozen=True)
class FetchOptions:
    """How remote shard files are fetched (the loader's `shard_*` knobs)."""

    cache_dir: str | None = None
    """Keep fetched shards here (shared by runs and processes); None: the `MMTRAIN_SHARD_CACHE` variable, else a
    private scratch directory emptied as the reader moves on (each epoch fetches its shards again)."""
    retries: int = 5
    """Tries after the first, on timeouts, dropped connections and HTTP 5xx (never on 4xx)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each later one (with up to 25 % jitter)."""
    timeout: float = 60.0
    """Seconds a connection or a read may stall before the try counts as failed."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise UserError(f"shard fetching: retries and backoff must be >= 0 and timeout > 0, got retries "
                            f"{self.retries}, backoff {self.backoff}, timeout {self.timeout}")

    def cache(self) -> str | None:
        """The cache directory in effect: the option, else the environment's, else None."""
        return self.cache_dir or os.environ.get(CACHE_ENV) or None


class FetchError(OSError):
    """A remote file that could not be read or written: names the URL, the tries made and the last cause."""

    def __init__(self, url: str, tries: int, cause: BaseException, retried: bool):
        self.url, self.tries, self.cause = url, tries, cause
        why = f"{type(cause).__name__}: {cause}"
        self.detail = (f"failed after {tries} tries, last: {why}" if retried
                       else f"{why} (not retried: the server's answer will not change)")
        super().__init__(f"{url}: {self.detail}")


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an exception (aiohttp's or botocore's, or their causes), if any."""
    seen = 0
    while exc is not None and seen < 5:
        status = getattr(exc, "status", None)
        if isinstance(status, int):
            return status
        meta = getattr(exc, "response", None)
        if isinstance(meta, dict):
            code = meta.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, TimeoutError, asyncio.TimeoutError]
    try:
        import aiohttp
        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import BotoCoreError
        types.append(BotoCoreError)
    except ImportError:
        pass
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """Whether trying again may succeed: timeouts, dropped or refused connections, HTTP 5xx / 408 / 429. A missing
    file, a refused permission or any other 4xx answer will not change."""
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:  # fsspec's HTTP `info` says "not found"
        return is_transient(exc.__cause__)  # for any failure: the cause tells a 404 from a dropped connection
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, _transient_types())


def retrying(url: str, action: Callable[[], T], opts: FetchOptions) -> T:
    """`action()`, tried again after `backoff · 2^i` seconds on a transient failure, up to `opts.retries` times."""
    for attempt in range(opts.retries + 1):
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise FetchError(url, attempt + 1, exc, retried=False) from exc
            if attempt == opts.retries:
                raise FetchError(url, attempt + 1, exc, retried=True) from exc
            delay = opts.backoff * 2 ** attempt * (1 + random.random() / 4)
            log.warning("%s: %s: %s; try %d of %d in %.2f s", url, type(exc).__name__, exc, attempt + 2,
                        opts.retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem(url: str, opts: FetchOptions) -> tuple[Any, str]:
    """The fsspec file system for `url` and the path inside it, with `opts.timeout` and no retries of its own."""
    protocol = url.split("://", 1)[0].lower()
    kwargs: dict[str, Any] = {}
    if protocol in ("http", "https"):
        import aiohttp  # fsspec's HTTP file system runs on it; imported only where a URL is read
        kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=opts.timeout,
                                                                    sock_read=opts.timeout)}
    elif protocol in ("s3", "s3a"):  # the endpoint as botocore reads it, passed on so fsspec's cached file system
        kwargs["endpoint_url"] = os.environ.get("AWS_ENDPOINT_URL")  # follows the variable (None: botocore's choice)
        kwargs["config_kwargs"] = {"connect_timeout": opts.timeout, "read_timeout": opts.timeout,
                                   "retries": {"total_max_attempts": 1}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        package = _NEEDS.get(protocol, f"the fsspec implementation of {protocol}://")
        raise UserError(f"{url}: reading {protocol}:// needs {package}: pip install {package}") from exc
    except ValueError as exc:  # an unknown protocol
        raise UserError(f"{url}: {exc}") from exc
    if hasattr(fs, "retries"):  # s3fs / gcsfs retry on their own; ours is the one policy
        fs.retries = 1
    return fs, path


def read_bytes(url: str, opts: FetchOptions) -> bytes:
    """The whole remote file (a manifest): FetchError after the tries, FileNotFoundError-caused at once."""
    fs, path = filesystem(url, opts)
    return retrying(url, lambda: fs.cat_file(path), opts)


def exists(url: str, opts: FetchOptions) -> bool:
    fs, path = filesystem(url, opts)
    return retrying(url, lambda: fs.exists(path), opts)


def remove(url: str, opts: FetchOptions) -> None:
    """Delete a remote file; one already gone is fine."""
    fs, path = filesystem(url, opts)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
    retrying(url, rm, opts)


def upload(local: str | os.PathLike, url: str, opts: FetchOptions) -> None:
    """Copy a local file to `url`, retried as reads are."""
    fs, path = filesystem(url, opts)
    retrying(url, lambda: fs.put_file(os.fspath(local), path), opts)


def cache_name(url: str) -> str:
    """The cached copy's file name: a hash of the whole URL (two sets may share shard names) and the shard's name."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:20] + "-" + url.rstrip("/").rsplit("/", 1)[-1]


def _download(fs: Any, path: str, url: str, target: str, opts: FetchOptions) -> None:
    """Fetch `url` to `target` atomically: each try writes a temporary file, renamed into place only when whole (its
    size checked against the remote size where the server states one)."""
    def attempt() -> None:
        part = f"{target}.part-{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            fs.get_file(path, part)
            size = _remote_size(fs, path)
            got = os.path.getsize(part)
            if size is not None and got != size:
                raise ConnectionError(f"short read: {got} of {size} bytes")
            os.replace(part, target)
        finally:
            if os.path.exists(part):
                os.unlink(part)
    retrying(url, attempt, opts)


def _remote_size(fs: Any, path: str) -> int | None:
    size = fs.info(path).get("size")
    return int(size) if size is not None else None


def fetch(url: str, opts: FetchOptions, scratch: Callable[[], str]) -> tuple[str, bool]:
    """A local copy of `url` and whether it is private (the caller deletes it once opened). With a cache directory
    the copy is kept there and reused while its size equals the remote size (a server that states no size, or one
    that cannot be reached: reused, with a warning for the latter); else it is written into `scratch()`."""
    fs, path = filesystem(url, opts)
    cache = opts.cache()
    if cache is None:
        target = os.path.join(scratch(), cache_name(url))
        _download(fs, path, url, target, opts)
        return target, True
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, cache_name(url))
    if os.path.exists(target):
        try:
            size = retrying(url, lambda: _remote_size(fs, path), opts)
        except FetchError as exc:  # the copy was renamed into place whole: better than no data
            log.warning("%s: %s; reading the cached copy %s unchecked", url, exc.detail, target)
            return target, False
        if size is None or size == os.path.getsize(target):
            return target, False
        log.warning("%s: cached copy %s has %d bytes, the remote file %d: fetching it again", url, target,
                    os.path.getsize(target), size)
    _download(fs, path, url, target, opts)
    return target, False
