"""A raw sample's captions: several per image, as lines of ``KEY.txt`` or a JSON list in ``KEY.json``."""

from __future__ import annotations

from typing import Any

from lf_common.errors import CorruptSampleError

CAPTIONS_META_KEY = "captions"  # a raw sample's KEY.json may hold its captions as a JSON list under this key


def sample_captions(caption: str, meta: dict[str, Any], origin: str = "sample") -> list[str]:
    """All captions of one raw sample: ``meta["captions"]`` (a JSON list of strings) when present, else the
    non-empty lines of ``KEY.txt`` (or the caption itself when it has none).

    Raises:
        CorruptSampleError: ``meta["captions"]`` is not a non-empty list of strings.
    """
    listed = meta.get(CAPTIONS_META_KEY)
    if listed is not None:
        if not isinstance(listed, list) or not listed or not all(isinstance(c, str) for c in listed):
            raise CorruptSampleError(
                f"{origin}: metadata '{CAPTIONS_META_KEY}' is {listed!r}, expected a non-empty list of strings"
            )
        return [c.strip() for c in listed]
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    return lines or [caption.strip()]
