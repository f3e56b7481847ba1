"""Corrupt samples: skipped, logged, counted, and the run failed once too many are bad.

A :class:`SkipCounter` is webdataset's exception handler: it logs each bad sample with its shard
and key, counts it, and fails the run once more than ``max_bad_fraction`` of the samples read are
bad (the fraction is taken over at least ``min_samples`` samples, so a bad sample early in a run
does not fail it on its own). Counts are kept per loader process; each batch carries its process's
new counts under :data:`COUNTS_KEY`, which the data modules take off (:func:`take_counts`) and add
up in the main process (:class:`SampleCounts`), where
:class:`~data_pipelines.loading.monitoring.SkippedSamplesMonitor` logs them. Samples a worker reads
after its last batch of an epoch (a dropped partial batch) reach the limit check but not the logged
counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lf_common.errors import ConfigError, DataError

log = logging.getLogger(__name__)
COUNTS_KEY = "__sample_counts__"  # (2,) int64 in a batch: samples read and samples skipped since the last batch


class TooManyCorruptSamples(DataError):
    """More corrupt samples than the configured fraction."""


@dataclass
class SampleCounts:
    """Samples read (good and bad) and samples skipped as corrupt.

    Attributes:
        seen: samples read, the skipped ones included.
        skipped: corrupt samples skipped.
    """

    seen: int = 0
    skipped: int = 0

    @property
    def bad_fraction(self) -> float:
        """``skipped / seen`` (0 before anything is read)."""
        return self.skipped / self.seen if self.seen else 0.0

    def add(self, seen: int, skipped: int) -> None:
        """Add the counts another process reported."""
        self.seen += seen
        self.skipped += skipped


class SkipCounter:
    """A webdataset exception handler that logs, counts and skips bad samples, and fails the run
    when too many are bad.

    The run fails when ``skipped > max_bad_fraction * max(seen, min_samples)``.

    Args:
        max_bad_fraction: the largest fraction of the samples read that may be bad.
        min_samples: the fraction is taken over at least this many samples (so up to
            ``max_bad_fraction * min_samples`` bad samples are tolerated at the start of a run).
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 1000) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction={max_bad_fraction}: expected a fraction in [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.counts = SampleCounts()
        self._reported = SampleCounts()

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far by this process."""
        return self.counts.skipped

    def count_good(self) -> None:
        """Count one sample that decoded."""
        self.counts.seen += 1

    def __call__(self, error: Exception) -> bool:
        """Count, log and skip the sample ``error`` is about (webdataset's handler protocol).

        Raises:
            TooManyCorruptSamples: the bad fraction is over the limit; names the last bad sample.
        """
        self.counts.add(1, 1)
        log.warning("skipped corrupt sample %d (of %d read): %s", self.counts.skipped, self.counts.seen, error)
        if self._over_limit():
            raise TooManyCorruptSamples(
                f"{self.counts.skipped} of {self.counts.seen} samples read are corrupt, more than "
                f"max_bad_fraction={self.max_bad_fraction} (taken over at least {self.min_samples} samples); "
                f"last: {error}"
            ) from error
        return True

    def _over_limit(self) -> bool:
        return self.counts.skipped > self.max_bad_fraction * max(self.counts.seen, self.min_samples)

    def skip_shard(self, url: str, error: Exception, samples: int) -> None:
        """Count an unreadable shard as ``samples`` bad samples (its estimated size) and log it.

        Raises:
            TooManyCorruptSamples: the bad fraction is over the limit; names the shard.
        """
        self.counts.add(samples, samples)
        log.warning(
            "skipped unreadable shard %s (about %d samples; %d of %d read are bad): %s",
            url,
            samples,
            self.counts.skipped,
            self.counts.seen,
            error,
        )
        if self._over_limit():
            raise TooManyCorruptSamples(
                f"shard {url} is unreadable ({error}); counted as its about {samples} samples, "
                f"{self.counts.skipped} of {self.counts.seen} samples read are bad, more than "
                f"max_bad_fraction={self.max_bad_fraction}; restore the shard or raise data.max_bad_fraction"
            ) from error

    def attach_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the counts since the previous batch to ``batch`` under :data:`COUNTS_KEY` (a batching stage)."""
        new = (self.counts.seen - self._reported.seen, self.counts.skipped - self._reported.skipped)
        self._reported = SampleCounts(self.counts.seen, self.counts.skipped)
        batch[COUNTS_KEY] = torch.tensor(new, dtype=torch.int64)
        return batch


def take_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """Remove :data:`COUNTS_KEY` from a batch; ``(seen, skipped)`` it held (zeros when absent)."""
    counts = batch.pop(COUNTS_KEY, None)
    if counts is None:
        return 0, 0
    seen, skipped = (int(v) for v in counts.tolist())
    return seen, skipped


class CountedDecode:
    """A decode step that counts each sample it decodes (a picklable wrapper)."""

    def __init__(self, decode: Callable[[dict[str, Any]], Any], counter: SkipCounter) -> None:
        self.decode = decode
        self.counter = counter

    def __call__(self, sample: dict[str, Any]) -> Any:
        decoded = self.decode(sample)
        self.counter.count_good()
        return decoded
