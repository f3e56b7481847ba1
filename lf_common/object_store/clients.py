"""The fsspec client of a store (s3fs for ``s3://``), its endpoint and credentials from the environment, and the
one-line error of a failed request."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from lf_common.errors import DataError

_CLIENT_VARIABLES = (  # a change of any gives a new client
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_MAX_ATTEMPTS",
)


class ObjectStoreError(DataError):
    """A URL that cannot be read or written: missing bucket or key, refused credentials, unreachable store."""


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store's client raises for a failed request: ``OSError`` and ``ValueError`` (fsspec's
    translations), and botocore's own errors (an unreachable endpoint) when botocore is installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError, ValueError)
    return (OSError, ValueError, BotoCoreError, ClientError)


STORE_ERRORS = _store_errors()
"""The exceptions the helpers here turn into :class:`ObjectStoreError`."""


def set_endpoint_url(url: str | None) -> None:
    """Use ``url`` as the S3 endpoint (an S3-compatible store) in this process and the processes it starts."""
    if url:
        os.environ["AWS_ENDPOINT_URL_S3"] = str(url)


def endpoint_url() -> str | None:
    """The S3 endpoint the environment names, or ``None`` (AWS)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system for ``url`` and the path inside it (``bucket/key`` for S3)."""
    protocol = url.split("://", 1)[0]
    return _filesystem(protocol, *_environment(protocol)), url.split("://", 1)[1]


def _environment(protocol: str) -> tuple[Any, ...]:
    """What a file system depends on: the endpoint and credentials (a change makes a new one), and the process."""
    if protocol not in ("s3", "s3a"):
        return (os.getpid(),)
    return (os.getpid(), endpoint_url(), *(os.environ.get(name) for name in _CLIENT_VARIABLES))


@lru_cache(maxsize=16)
def _filesystem(protocol: str, pid: int, endpoint: str | None = None, *_client: str | None) -> AbstractFileSystem:
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        options |= {"endpoint_url": endpoint} if endpoint else {}
        options["use_listings_cache"] = False  # other processes (ranks, a rerun) write: ask the store every time
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))  # backoff on throttling and dropped connections
        options["config_kwargs"] = {"retries": {"max_attempts": attempts, "mode": "standard"}}
    return fsspec.filesystem(protocol, **options)


def storage_error(url: str, error: BaseException, expected: str) -> ObjectStoreError:
    """One line for a failed access to ``url``: what went wrong and what was ``expected``."""
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    if isinstance(error, FileNotFoundError):
        told = str(error).lower()  # without the URL, key and bucket name, which may hold "bucket" themselves
        path = url.split("://", 1)[-1]
        for name in (url, path, path.split("/", 1)[0]):
            told = told.replace(name.lower(), "") if name else told
        reason = "the bucket does not exist" if "bucket" in told else "nothing under this key"
    elif isinstance(error, PermissionError):
        reason = f"access refused ({error})".splitlines()[0]
        expected = "credentials the store accepts: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    endpoint = f" at endpoint {endpoint_url()}" if url.startswith("s3") and endpoint_url() else ""
    return ObjectStoreError(f"{url}{endpoint}: {reason}; expected {expected}")
