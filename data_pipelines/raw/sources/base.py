"""What every source yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceItem:
    """One image-caption pair before validation.

    Attributes:
        origin: where it came from (a file path, ``table.csv:12``, ``digits[7]``) for messages.
        image_bytes: the encoded image as the source holds it.
        caption: the caption text.
        meta: metadata stored as ``KEY.json``.
        mask_bytes: an encoded loss mask of the image's size (grayscale), or ``None``: no mask file.
        mask_origin: where the mask came from (its file), for messages.
    """

    origin: str
    image_bytes: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    mask_bytes: bytes | None = None
    mask_origin: str = ""
