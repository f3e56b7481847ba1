"""Writing one latent shard so that a crash never leaves a shard under its final name that is not complete: the
samples go to a temporary tar, renamed into place (or, for a store, uploaded whole) and then recorded."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from data_pipelines.latents.format import CacheKey, LatentSample, ShardEntry, encode_latent_sample, save_entry
from data_pipelines.shards.tar_writer import open_tar_writer
from lf_common import object_store
from lf_common.atomic import TMP_SUFFIX

log = logging.getLogger(__name__)


class ShardOutput:
    """One latent shard being written: samples go to ``NAME.tar.tmp``, which :meth:`finish` renames
    to ``NAME.tar`` and records (``NAME.entry.json``); :meth:`abort` removes it. A crash leaves no
    file under the final name that is not complete.

    For an object-store target (``s3://...``) the temporary is a local file, uploaded whole by
    :meth:`finish` (the object appears only once the upload completed), then recorded.

    Args:
        target: the final shard path or URL.
        source: the raw shard it is made from.
        key: its cache key.
    """

    def __init__(self, target: str | Path, source: str, key: CacheKey) -> None:
        self.target = str(target)
        self.name = object_store.basename(self.target)
        self.source = source
        self.key = key
        if object_store.is_store(self.target):  # no rename there: written locally, then uploaded
            self.tmp = Path(tempfile.mkdtemp(prefix="lf-upload-")) / (self.name + TMP_SUFFIX)
        else:
            self.tmp = Path(self.target + TMP_SUFFIX)
            self.tmp.unlink(missing_ok=True)
        self.writer = open_tar_writer(self.tmp)
        self.count = 0
        self.loss_masks = 0

    def write(self, samples: list[LatentSample]) -> None:
        """Append encoded samples."""
        for sample in samples:
            self.writer.write(encode_latent_sample(sample))
        self.count += len(samples)
        self.loss_masks += sum(sample.loss_mask is not None for sample in samples)

    def finish(self, skipped: int) -> ShardEntry:
        """Close, rename into place and record the shard; ``skipped``: corrupt input samples left out."""
        self.writer.close()
        if object_store.is_store(self.target):
            try:
                object_store.upload(self.tmp, self.target)
            finally:
                self._remove_tmp()
        else:
            os.replace(self.tmp, self.target)
        entry = ShardEntry(
            name=self.name,
            num_samples=self.count,
            source=object_store.canonical(self.source),
            source_sha256=self.key.source_sha256,
            skipped=skipped,
            cache_key=asdict(self.key),
            loss_masks=self.loss_masks,
        )
        save_entry(self.target, entry)
        log.info("%s: %d samples from %s (%d skipped)", entry.name, entry.num_samples, self.source, skipped)
        return entry

    def abort(self) -> None:
        """Drop the partial shard."""
        self.writer.close()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        self.tmp.unlink(missing_ok=True)
        if object_store.is_store(self.target):
            shutil.rmtree(self.tmp.parent, ignore_errors=True)
