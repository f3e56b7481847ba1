"""A real S3 server for the tests: moto's server mode on 127.0.0.1, started and stopped by the fixtures.

Why moto: it installs from the package registry as a Python package (no binary to fetch, no
service for ``.ci/run`` to start), speaks the S3 REST API over HTTP to any client (s3fs/aiobotocore
here, in this process and in the commands the tests start), and keeps its buckets in memory.

``s3_server`` (one per test session, and per xdist worker) gives the endpoint URL; ``s3_bucket``
gives each test a new empty bucket and points the standard AWS variables at the server (fake
credentials, the endpoint in ``AWS_ENDPOINT_URL_S3``), which the commands the test starts inherit.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lf_common import object_store

_BUCKETS = itertools.count()
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3 server (moto) on 127.0.0.1 at a free port, for the whole session; its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def point_aws_at(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the standard AWS variables for the test server (no profile, fake keys, its endpoint)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": server}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The standard AWS variables pointing at the test server for this test; the endpoint."""
    point_aws_at(s3_server, monkeypatch)
    return s3_server


def make_bucket() -> str:
    """A new empty bucket on the server the environment names; its ``s3://`` URL."""
    name = f"lf-test-{os.getpid()}-{next(_BUCKETS)}"
    fs, _ = object_store.filesystem(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new empty bucket for this test (``s3://lf-test-...``), with :func:`s3_env` set."""
    return make_bucket()


def upload_folder(folder: Path, url: str, pattern: str = "*") -> list[str]:
    """Upload the files of ``folder`` matching ``pattern`` under prefix ``url``; their URLs, sorted."""
    urls = []
    for path in sorted(folder.glob(pattern)):
        target = object_store.join(url, path.name)
        object_store.upload(path, target)
        urls.append(target)
    return urls
