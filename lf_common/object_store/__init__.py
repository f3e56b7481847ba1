"""The storage module: local paths and URLs (``s3://bucket/key``, any fsspec protocol) alike.

This is the one module that asks whether a path is a URL (:func:`is_url`; a test keeps it so): code above it
opens, lists, reads, writes, checks and shows paths through the functions here (:func:`open_path`,
:func:`list_entries`, :func:`list_files`, :func:`glob`, :func:`exists`, :func:`read_path`, :func:`write_path`,
:func:`require_writable`, :func:`canonical`, :func:`display`, ...), and gets local copies of URLs through
:mod:`lf_common.object_cache`; only a writer that makes a write atomic in two ways (a rename on local disk, an
upload to a store, as :mod:`lf_common.staged_output` does) asks :func:`is_store`.

Local paths go through the file system; a URL goes through fsspec (s3fs for ``s3://``),
streamed in blocks, never downloaded whole. Credentials and region come from the standard AWS
environment variables or profile (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config``); the
endpoint of an S3-compatible store from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, which
:func:`set_endpoint_url` sets from a config option (so loader workers and other ranks inherit it).

An object appears under its key only once its upload completed (S3 makes a PUT or a multipart
upload visible whole), so a writer uploads a complete local file and only then records it.

``pipe:`` commands and ``http(s)://`` URLs are left to webdataset (:func:`is_url` is false for them).
"""

from __future__ import annotations

import glob as local_glob
import os
import posixpath
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

from lf_common.atomic import atomic_path
from lf_common.errors import DataError

_PASSED_TO_WEBDATASET = ("pipe:", "http://", "https://")
_BLOCK_SIZE = 8 << 20  # bytes per ranged read of a streamed object
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


def is_url(path: object) -> bool:
    """Whether ``path`` names an object in a store fsspec opens (``s3://``, ``gs://``, ``memory://``, ...)."""
    text = str(path)
    return "://" in text and not text.startswith(_PASSED_TO_WEBDATASET) and not text.startswith("file://")


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


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a URL or a local path."""
    if is_url(base):
        return posixpath.join(base, *names)
    return os.path.join(base, *names)


def basename(path: str) -> str:
    """The last part of a URL or path (``s3://b/p/shard-000001.tar`` -> ``shard-000001.tar``)."""
    return posixpath.basename(str(path).rstrip("/"))


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


def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    """Open an object for streamed reading (ranged reads of a few MB) or writing.

    Raises:
        ObjectStoreError: the bucket or key is missing, or the store refused or could not be reached.
    """
    fs, path = filesystem(url)
    try:
        return fs.open(path, mode, block_size=_BLOCK_SIZE)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "an existing object" if "r" in mode else "a writable bucket") from error


def exists(url: str | os.PathLike[str]) -> bool:
    """Whether a local file or folder, an object, or a prefix holding objects is at ``url``."""
    if not is_url(url):
        return os.path.exists(url)
    fs, path = filesystem(str(url))
    try:
        return fs.exists(path)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a reachable bucket") from error


def require_bucket(url: str, expected: str) -> None:
    """Check that the bucket of ``url`` exists and answers (one request), before work that will write there.

    Raises:
        ObjectStoreError: the bucket does not exist, the credentials are refused, or the store cannot be
            reached; names ``url``, the endpoint and what was ``expected``.
    """
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except STORE_ERRORS as error:
        raise storage_error(url, error, expected) from error
    if not found:
        raise storage_error(url, FileNotFoundError(f"bucket {bucket} not found"), expected)


def read_bytes(url: str) -> bytes:
    """The whole object (small files: manifests, records)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "an existing object") from error


def write_bytes(url: str, data: bytes) -> None:
    """Put ``data`` at ``url`` in one request: readers see the old object or the new one, never a part."""
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a writable bucket") from error


def upload(local: str | os.PathLike[str], url: str) -> None:
    """Upload a complete local file to ``url`` (visible under its key only once the whole upload completed)."""
    fs, path = filesystem(url)
    try:
        fs.put_file(os.fspath(local), path)
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a writable bucket") from error


def upload_folder(local: str | os.PathLike[str], url: str, last: tuple[str, ...] = ()) -> list[str]:
    """Upload every file under the local folder ``local`` to the prefix ``url``, the files named in ``last``
    (paths relative to ``local``) after all others, in that order; the URLs uploaded.

    A reader that takes the prefix as complete only once a ``last`` file is there (a DeepSpeed
    checkpoint's ``latest``, a pipeline's ``model_index.json``) never sees a partial upload as whole.
    """
    root = os.fspath(local)
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
    names = [f for f in files if f not in last] + [f for f in last if f in files]
    urls = [join(url, *name.split(os.sep)) for name in names]
    for name, target in zip(names, urls, strict=True):
        upload(os.path.join(root, name), target)
    return urls


def download(url: str, local: str | os.PathLike[str]) -> None:
    """Copy the object at ``url`` to the local file ``local`` (overwritten; the caller makes it atomic)."""
    fs, path = filesystem(url)
    try:
        fs.get_file(path, os.fspath(local))
    except STORE_ERRORS as error:
        raise storage_error(url, error, "an existing object") from error


def is_bucket(url: str) -> bool:
    """Whether ``url`` names a whole bucket (``s3://bucket``, ``s3://bucket/``), no key or prefix in it."""
    return is_url(url) and "/" not in url.split("://", 1)[1].strip("/")


def remove(url: str, first: tuple[str, ...] = ()) -> None:
    """Delete the object at ``url``, or every object under the prefix ``url`` (a "folder"): the ones named in
    ``first`` (relative to ``url``) before the rest, so a folder stops being complete before it disappears.
    Nothing there is fine.

    Raises:
        ObjectStoreError: ``url`` is a whole bucket (its objects and the bucket itself would go).
    """
    if is_bucket(url):
        raise storage_error(url, ValueError("a whole bucket is never deleted"), "a prefix in the bucket (s3://b/NAME)")
    fs, path = filesystem(url)
    try:
        for name in first:
            if fs.exists(posixpath.join(path, name)):
                fs.rm_file(posixpath.join(path, name))
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        return
    except STORE_ERRORS as error:
        raise storage_error(url, error, "a writable bucket") from error


def object_infos(url: str, expected: str = "an existing object or prefix") -> dict[str, dict[str, Any]]:
    """The objects at ``url`` (one object, or every object under the prefix, at any depth), by path relative
    to ``url`` (``""`` for a single object): fsspec's details (``size``, ``ETag``, ``LastModified``, ...).

    Raises:
        ObjectStoreError: nothing is at ``url``, or the store cannot be reached; names ``url``, the endpoint
            and what was ``expected``.
    """
    fs, path = filesystem(url)
    path = path.rstrip("/")
    try:
        fs.invalidate_cache(path)
        found = fs.find(path, detail=True)
    except STORE_ERRORS as error:
        raise storage_error(url, error, expected) from error
    if not found:
        require_bucket(url, expected)
        raise storage_error(url, FileNotFoundError(url), expected)
    if list(found) == [path]:
        return {"": found[path]}
    return {name[len(path) + 1 :]: info for name, info in found.items() if name.startswith(path + "/")}


def list_entries(prefix: str | os.PathLike[str], must_exist: bool = False) -> list[dict[str, Any]]:
    """What lies directly under a local folder or a ``prefix``: files or objects (``type: file``) and folders or
    sub-prefixes (``type: directory``), each with ``url`` (its path or URL) and ``modified`` (when it was written,
    seconds since the epoch; 0 for a sub-prefix), and for an object fsspec's details; empty when nothing is there
    (unless ``must_exist``).

    Raises:
        ObjectStoreError: the bucket is missing or the store cannot be reached; with ``must_exist``, also nothing
            under the prefix.
        FileNotFoundError: with ``must_exist``, a local folder that is not there.
    """
    if not is_url(prefix):
        return _local_entries(os.fspath(prefix), must_exist)
    prefix = str(prefix)
    fs, path = filesystem(prefix)
    protocol = prefix.split("://", 1)[0]
    try:
        fs.invalidate_cache(path.rstrip("/"))
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError as error:
        if must_exist:
            raise storage_error(prefix, error, "an existing bucket and prefix") from error
        return []
    except STORE_ERRORS as error:
        raise storage_error(prefix, error, "a reachable bucket") from error
    return [
        {
            **entry,
            "url": f"{protocol}://{entry['name'].rstrip('/')}",
            "modified": entry["LastModified"].timestamp() if "LastModified" in entry else 0.0,
        }
        for entry in entries
    ]


def _local_entries(folder: str, must_exist: bool) -> list[dict[str, Any]]:
    """:func:`list_entries` of a local folder (empty when it is missing or a file, unless ``must_exist``)."""
    try:
        with os.scandir(folder) as found:
            listed = [(entry.path, entry.is_dir(), entry.stat()) for entry in found]
    except (FileNotFoundError, NotADirectoryError) as error:
        if must_exist:
            raise FileNotFoundError(f"{folder}: no such folder") from error
        return []
    return [
        {"url": path, "type": "directory" if is_dir else "file", "size": stat.st_size, "modified": stat.st_mtime}
        for path, is_dir, stat in sorted(listed)
    ]


def list_objects(prefix: str, suffix: str = "") -> list[str]:
    """URLs of the objects directly under ``prefix`` (a "folder") whose names end with ``suffix``, sorted.

    Raises:
        ObjectStoreError: the bucket is missing or unreachable; names the prefix.
    """
    fs, path = filesystem(prefix)
    protocol = prefix.split("://", 1)[0]
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError as error:
        raise storage_error(prefix, error, "an existing bucket and prefix") from error
    except STORE_ERRORS as error:
        raise storage_error(prefix, error, "a reachable bucket") from error
    names = [entry["name"] for entry in entries if entry.get("type") == "file" and entry["name"].endswith(suffix)]
    return sorted(f"{protocol}://{name}" for name in names)


def glob_objects(pattern: str) -> list[str]:
    """URLs of the objects matching a glob (``s3://bucket/data/*.tar``), sorted."""
    fs, path = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    try:
        return sorted(f"{protocol}://{name}" for name in fs.glob(path))
    except STORE_ERRORS as error:
        raise storage_error(pattern, error, "an existing bucket") from error


def is_file(path: str | os.PathLike[str]) -> bool:
    """Whether a local file or an object exists at ``path``."""
    return exists(str(path)) if is_url(path) else os.path.isfile(path)


def is_folder(path: str | os.PathLike[str]) -> bool:
    """Whether a local folder, or a prefix holding objects, is at ``path``."""
    return exists(str(path)) if is_url(path) else os.path.isdir(path)


def read_path(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a local file or an object."""
    if is_url(path):
        return read_bytes(str(path))
    with open(path, "rb") as handle:
        return handle.read()


def write_path(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a local file (to a temporary name, then renamed) or an object (one PUT): never seen half-written."""
    if is_url(path):
        write_bytes(str(path), data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def parent(path: str | os.PathLike[str]) -> str:
    """The folder or prefix holding ``path`` (``s3://b/run/last.ckpt`` -> ``s3://b/run``; ``last.ckpt`` -> ``.``)."""
    text = os.fspath(path).rstrip("/")
    if is_url(text):
        return text.rsplit("/", 1)[0]
    return os.path.dirname(text) or "."


def canonical(path: str | os.PathLike[str]) -> str:
    """How ``path`` is recorded and shown: a URL without its trailing ``/``, a local path made absolute."""
    return os.fspath(path).rstrip("/") if is_url(path) else str(Path(path).resolve())


def open_path(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a local file or an object for reading (an object streamed in ranged reads).

    Raises:
        ObjectStoreError: the bucket or key is missing, or the store refused or could not be reached.
        OSError: a local file cannot be opened.
    """
    return open_url(str(path)) if is_url(path) else open(path, "rb")


def require_writable(path: str | os.PathLike[str], expected: str) -> None:
    """Before work that will write to ``path``: a URL's bucket must exist and answer (one request); a local
    path needs nothing (its folders are made when written).

    Raises:
        ObjectStoreError: see :func:`require_bucket`.
    """
    if is_url(path):
        require_bucket(str(path), expected)


def is_store(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is in a store (no rename: a writer stages locally, then uploads; a reader streams it).

    Only writers that make a write atomic in two ways (a rename on local disk, an upload to a store) and the
    stream openers ask; everything else goes through the path-agnostic functions here, which answer it once.
    """
    return path is not None and is_url(path)


def display(path: str | os.PathLike[str]) -> str:
    """``path`` as shown to the user: a URL without its trailing ``/``, a local path as ``Path`` writes it."""
    return os.fspath(path).rstrip("/") if is_url(path) else str(Path(path))


def as_path(path: str | os.PathLike[str]) -> Path | str:
    """A local path as a ``Path``; a URL as the string it is (a ``Path`` would fold its ``//``)."""
    return os.fspath(path) if is_url(path) else Path(path)


def list_files(folder: str | os.PathLike[str], suffix: str = "") -> list[str]:
    """The files of a local folder, or the objects directly under a prefix (a trailing ``/`` or none), whose names
    end with ``suffix``: paths or URLs, sorted.

    Raises:
        ObjectStoreError: the bucket or the prefix is missing, or the store cannot be reached; names the prefix.
        FileNotFoundError: a local folder that is not there.
    """
    entries = list_entries(folder, must_exist=True)
    return sorted(e["url"] for e in entries if e.get("type") == "file" and e["url"].endswith(suffix))


def glob(pattern: str) -> list[str]:
    """The local paths or the objects matching a glob (``data/*.tar``, ``s3://bucket/data/*.tar``), sorted."""
    return glob_objects(pattern) if is_url(pattern) else sorted(local_glob.glob(pattern))


def passed_through(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is left to webdataset to open as it is (a ``pipe:`` command, an ``http(s)://`` or
    ``file://`` URL): neither a local path nor an object this module reads."""
    text = str(path)
    return text.startswith("pipe:") or ("://" in text and not is_url(text))


def make_folder(path: str | os.PathLike[str]) -> None:
    """Create a local folder (and its parents) when missing; a prefix needs nothing (it exists once objects do)."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def names_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` can name a folder without a request: a local folder that is there, or any prefix URL (whose
    objects are checked, with the store's one-line error, when it is read)."""
    return is_url(path) or os.path.isdir(path)


def names_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` can name a file without a request: a local file that is there, or an object URL (checked,
    with the store's one-line error, when it is read)."""
    return is_url(path) or os.path.isfile(path)
