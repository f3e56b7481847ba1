"""The storage interface: local paths and URLs (``s3://bucket/key``, any fsspec protocol) alike.

This is the one package that asks whether a path is a URL (:func:`is_url`; a test keeps it so): code above it
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

The functions live in modules of one role, and callers import them from here (``from lf_common import
object_store``): :mod:`~lf_common.object_store.paths` (paths and URLs as text),
:mod:`~lf_common.object_store.clients` (the fsspec client, its endpoint and errors),
:mod:`~lf_common.object_store.checks` (what is there, a bucket that answers), :mod:`~lf_common.object_store.reading`,
:mod:`~lf_common.object_store.writing` (atomic writes, uploads, deletes) and :mod:`~lf_common.object_store.listing`.
A test that replaces a function here (``monkeypatch.setattr(object_store, "upload", ...)``) reaches the callers that
call it through this package, not the calls between its modules (``upload_folder`` calls ``writing.upload``).
"""

from __future__ import annotations

from lf_common.object_store.checks import (
    exists,
    is_file,
    is_folder,
    require_bucket,
    require_writable,
)
from lf_common.object_store.clients import (
    STORE_ERRORS,
    ObjectStoreError,
    endpoint_url,
    filesystem,
    set_endpoint_url,
    storage_error,
)
from lf_common.object_store.listing import (
    glob,
    glob_objects,
    list_entries,
    list_files,
    list_objects,
    object_infos,
)
from lf_common.object_store.paths import (
    as_path,
    basename,
    canonical,
    display,
    is_bucket,
    is_store,
    is_url,
    join,
    names_file,
    names_folder,
    parent,
    passed_through,
)
from lf_common.object_store.reading import (
    download,
    open_path,
    open_url,
    read_bytes,
    read_path,
)
from lf_common.object_store.writing import (
    make_folder,
    remove,
    upload,
    upload_folder,
    write_bytes,
    write_path,
)

__all__ = [
    "STORE_ERRORS",
    "ObjectStoreError",
    "as_path",
    "basename",
    "canonical",
    "display",
    "download",
    "endpoint_url",
    "exists",
    "filesystem",
    "glob",
    "glob_objects",
    "is_bucket",
    "is_file",
    "is_folder",
    "is_store",
    "is_url",
    "join",
    "list_entries",
    "list_files",
    "list_objects",
    "make_folder",
    "names_file",
    "names_folder",
    "object_infos",
    "open_path",
    "open_url",
    "parent",
    "passed_through",
    "read_bytes",
    "read_path",
    "remove",
    "require_bucket",
    "require_writable",
    "set_endpoint_url",
    "storage_error",
    "upload",
    "upload_folder",
    "write_bytes",
    "write_path",
]
