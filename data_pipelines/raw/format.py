"""The raw-shard format: image-caption pairs in img2dataset's WebDataset layout.

Each sample of a raw shard is three tar members sharing one key::

    KEY.jpg | KEY.png | KEY.webp   the encoded image, bytes as the source had them
    KEY.txt                        the caption, UTF-8
    KEY.json                       metadata (source path or index, labels, ...)

That is the layout img2dataset writes, so its output is valid input. img2dataset's ``KEY.json``
holds ``url``, ``key``, ``status``, ``error_message``, ``width``, ``height``, ``original_width``,
``original_height``, ``exif``, ``sha256``...; a sample whose ``status`` is not ``"success"`` is
treated as corrupt (skipped and counted by the readers, reported by validation).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lf_common.errors import CorruptSampleError

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
META_KEY = "json"
PIL_FORMAT_TO_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class RawSample:
    """One image-caption pair as stored in a raw shard."""

    key: str
    image_bytes: bytes
    image_ext: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def encode_raw_sample(sample: RawSample) -> dict[str, Any]:
    """The tar members of one sample, as ``webdataset.TarWriter`` takes them (all bytes)."""
    if sample.image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"sample {sample.key}: image extension {sample.image_ext!r} not in {IMAGE_EXTENSIONS}")
    return {
        "__key__": sample.key,
        sample.image_ext: sample.image_bytes,
        CAPTION_KEY: sample.caption.encode("utf-8"),
        META_KEY: json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }


def sample_origin(sample: dict[str, Any]) -> str:
    """``shard.tar: sample KEY`` for messages about a sample read by webdataset."""
    return f"{sample.get('__url__', '<unknown shard>')}: sample {sample.get('__key__', '<no key>')}"


def failed_status(meta: dict[str, Any]) -> str | None:
    """Why ``KEY.json`` marks a sample as failed (img2dataset's ``status`` and ``error_message``),
    or ``None`` for a sample without a status or with ``status == "success"``."""
    status = meta.get("status") if isinstance(meta, dict) else None
    if status is None or status == "success":
        return None
    message = meta.get("error_message")
    return f"status {status!r}" + (f" ({message})" if message else "")


def decode_raw_sample(sample: dict[str, Any]) -> tuple[str, Image.Image, str, dict[str, Any]]:
    """Decode one webdataset sample of a raw shard.

    Returns:
        ``(key, image, caption, meta)``, the image converted to RGB.

    Raises:
        CorruptSampleError: the image is missing or does not decode, the caption is missing, or
            ``KEY.json`` does not parse or marks the sample as failed (img2dataset's ``status``).
    """
    origin = sample_origin(sample)
    try:
        meta = json.loads(sample[META_KEY]) if META_KEY in sample else {}
    except ValueError as error:
        raise CorruptSampleError(f"{origin}: member '{META_KEY}' is not valid JSON ({error})") from error
    failure = failed_status(meta)
    if failure is not None:
        raise CorruptSampleError(f"{origin}: '{META_KEY}' marks the sample as failed: {failure}")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        raise CorruptSampleError(f"{origin}: no image member (expected one of {IMAGE_EXTENSIONS})")
    if CAPTION_KEY not in sample:
        raise CorruptSampleError(f"{origin}: no caption member '{CAPTION_KEY}'")
    try:
        image = Image.open(io.BytesIO(sample[image_ext]))
        image = image.convert("RGB")
    except Exception as error:  # PIL raises several types for bad bytes
        raise CorruptSampleError(f"{origin}: image '{image_ext}' does not decode ({error})") from error
    caption = sample[CAPTION_KEY].decode("utf-8").strip()
    return sample["__key__"], image, caption, meta


def normalize_image_bytes(data: bytes, origin: str) -> tuple[bytes, str]:
    """Check that ``data`` fully decodes; keep JPEG/PNG/WebP bytes as they are, re-encode others as PNG.

    Returns:
        ``(bytes, extension)`` ready for a raw shard.

    Raises:
        CorruptSampleError: the bytes do not decode as an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            extension = PIL_FORMAT_TO_EXTENSION.get(image.format or "")
            if extension is not None:
                return data, extension
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue(), "png"
    except Exception as error:  # PIL raises several types for bad bytes
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))  # PIL names the buffer, not the file
        raise CorruptSampleError(f"{origin}: does not decode as an image ({reason})") from error
