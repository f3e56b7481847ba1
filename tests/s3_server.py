"""A real S3 server for the tests: moto's server mode on 127.0.0.1, started and stopped by the fixtures.

Why moto: it installs from the package registry as a Python package (no binary to fetch, no
service for ``.ci/run`` to start), speaks the S3 REST API over HTTP to any client (s3fs/aiobotocore
here, in this process and in the commands the tests start), and keeps its buckets in memory.

The server keeps its buckets in moto's in-process backends, so :func:`server_down` can stop it and
start it again on the same port with every object still there (a store that went away and came back).

``s3_server`` (one per test session, and per xdist worker) gives the endpoint URL; ``s3_bucket``
gives each test a new empty bucket and points the standard AWS variables at the server (fake
credentials, the endpoint in ``AWS_ENDPOINT_URL_S3``), which the commands the test starts inherit.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lf_common import object_store

_BUCKETS = itertools.count()
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


_RUNNING: dict[str, object] = {}
"""The running server of each endpoint URL."""


def _start(port: int = 0) -> str:
    """Start a moto server on 127.0.0.1 (``port`` 0: a free one); its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _RUNNING[url] = server
    return url


def _stop(url: str) -> None:
    server = _RUNNING.pop(url, None)
    if server is not None:
        server.stop()  # type: ignore[attr-defined]


@contextmanager
def server_down(url: str) -> Iterator[None]:
    """Stop the server at ``url`` for the block, then start it again on the same port (objects kept)."""
    _stop(url)
    try:
        yield
    finally:
        _start(int(url.rsplit(":", 1)[1]))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3 server (moto) on 127.0.0.1 at a free port, for the whole session; its endpoint URL."""
    url = _start()
    try:
        yield url
    finally:
        _stop(url)


def point_aws_at(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the standard AWS variables for the test server (no profile, fake keys, its endpoint)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**AWS_TEST_ENV, "AWS_ENDPOINT_URL_S3": server, "AWS_MAX_ATTEMPTS": "2"}.items():
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


def upload_times(url: str) -> dict[str, datetime.datetime]:
    """When each object under the prefix ``url`` was last written, by path relative to ``url``, to the
    microsecond (the server's own record: it runs in this process; listings give whole seconds)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys = s3_backends[DEFAULT_ACCOUNT_ID]["global"].get_bucket(bucket).keys
    return {name[len(prefix) :]: key.last_modified for name, key in keys.items() if name.startswith(prefix)}
