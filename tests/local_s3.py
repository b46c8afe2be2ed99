"""A real S3 server for tests: moto's threaded server on a free loopback port, reached as botocore is (the AWS
variables), so the test process and the rank processes it starts both see it."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from mmtrain.data.remote_files import CACHE_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(mp: pytest.MonkeyPatch, bucket: str, folders: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """The server with `bucket` holding each folder's files under its prefix; the AWS variables set through `mp`
    (the shard cache variable cleared). Yields {"client": boto3 client, "port": port}."""
    from moto.server import ThreadedMotoServer  # test-only server

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(name, value)
        mp.delenv(CACHE_ENV, raising=False)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        for prefix, folder in folders.items():
            for path in sorted(folder.iterdir()):
                client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        yield {"client": client, "port": port}
    finally:
        server.stop()
