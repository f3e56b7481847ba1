"""Outputs that may go to a bucket: write to local disk, then upload (a store has no rename).

:func:`staged_output` gives the writer a local path: the target itself when it is local (the writer
makes it atomic as before), or a temporary one for a URL, uploaded once the block succeeds and
removed in either case. A folder is uploaded with its ``last`` files after all others (an export's
``model_index.json``: a reader that opens the folder by it never sees a partial upload), and a
folder that was there before loses those files first, then its other objects, so it is never a mix
of two writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lf_common import object_store


@contextmanager
def staged_output(target: str | os.PathLike[str], last: tuple[str, ...] = (), replace: bool = True) -> Iterator[Path]:
    """Yield where to write ``target`` (a file or a folder); a URL is uploaded when the block succeeds.

    Args:
        target: a local path, or a URL (``s3://bucket/export/step-1200``).
        last: for a folder, files (relative paths) uploaded after all others, in this order.
        replace: a folder replaces what was under the URL (``False``: adds to it, e.g. more images).

    Raises:
        ObjectStoreError: the upload failed; names the URL and the endpoint. A whole bucket as ``target``
            (``s3://bucket``, nothing it could replace but every object there), before the block runs.
    """
    if not object_store.is_store(target):
        yield Path(target)
        return
    url = str(target).rstrip("/")
    if replace and object_store.is_bucket(url):
        raise object_store.ObjectStoreError(
            f"{url}: a whole bucket, whose every object a write here would replace; expected a prefix in it "
            f"({url}/NAME)"
        )
    scratch = Path(tempfile.mkdtemp(prefix="lf-upload-"))
    try:
        local = scratch / object_store.basename(url)
        yield local
        if local.is_dir():
            if replace:
                object_store.remove(url, first=last)
            object_store.upload_folder(local, url, last=last)
        else:
            object_store.upload(local, url)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
