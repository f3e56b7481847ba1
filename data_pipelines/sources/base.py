"""What every source yields."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class SourceItem:
    """One image-caption pair before validation.

    Attributes:
        origin: where it came from (a file path, ``table.csv:12``, ``digits[7]``) for messages.
        image_bytes: the encoded image as the source holds it.
        caption: the caption text.
        meta: metadata stored as ``KEY.json``.
    """

    origin: str
    image_bytes: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """An iterable of :class:`SourceItem`, in a deterministic order."""

    def __iter__(self) -> Iterator[SourceItem]: ...
