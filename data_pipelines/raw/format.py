"""The raw-shard format: image-caption pairs in img2dataset's WebDataset layout.

Each sample of a raw shard is three tar members sharing one key::

    KEY.jpg | KEY.png | KEY.webp   the encoded image, bytes as the source had them
    KEY.txt                        the caption, UTF-8
    KEY.json                       metadata (source path or index, labels, ...)

and, optionally, a loss mask (docs/data.md, "Masked loss")::

    KEY.mask.png                   grayscale (mode L) PNG of the image's size: 255 where the loss counts,
                                   0 where it is ignored (from ``KEY.mask.png`` beside an image, or its alpha)

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
LOSS_MASK_KEY = "mask.png"
LOSS_MASK_MODES = ("L", "1")  # grayscale, or bilevel (stored as L: 0 and 255)


@dataclass
class RawSample:
    """One image-caption pair as stored in a raw shard."""

    key: str
    image_bytes: bytes
    image_ext: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    mask_bytes: bytes | None = None  # the loss mask, a mode L PNG of the image's size (KEY.mask.png)


def encode_raw_sample(sample: RawSample) -> dict[str, Any]:
    """The tar members of one sample, as ``webdataset.TarWriter`` takes them (all bytes)."""
    if sample.image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"sample {sample.key}: image extension {sample.image_ext!r} not in {IMAGE_EXTENSIONS}")
    members = {
        "__key__": sample.key,
        sample.image_ext: sample.image_bytes,
        CAPTION_KEY: sample.caption.encode("utf-8"),
        META_KEY: json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }
    if sample.mask_bytes is not None:
        members[LOSS_MASK_KEY] = sample.mask_bytes
    return members


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


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_loss_mask(mask: Image.Image, image_size: tuple[int, int], where: str) -> Image.Image:
    """``mask`` as a mode L image, checked against its image's ``(width, height)``.

    Raises:
        CorruptSampleError: one line naming ``where`` (the mask's file or sample), what the mask is and what
            it should be (a grayscale image of the image's size).
    """
    width, height = image_size
    if mask.mode not in LOSS_MASK_MODES or mask.size != (width, height):
        raise CorruptSampleError(
            f"{where}: loss mask is mode {mask.mode} {mask.size[0]}x{mask.size[1]}, expected a grayscale "
            f"(mode L) image of its image's size {width}x{height}"
        )
    return mask.convert("L")


def loss_mask_png(data: bytes, image_size: tuple[int, int], where: str) -> bytes:
    """A loss mask file's bytes as a raw shard's ``mask.png`` member: checked (mode L or 1, the image's size)
    and stored as a mode L PNG.

    Raises:
        CorruptSampleError: the bytes do not decode, or the mask has another mode or size (one line).
    """
    try:
        with Image.open(io.BytesIO(data)) as mask:
            mask.load()
            checked = check_loss_mask(mask, image_size, where)
    except CorruptSampleError:
        raise
    except Exception as error:  # PIL raises several types for bad bytes
        raise CorruptSampleError(f"{where}: loss mask does not decode as an image ({error})") from error
    return _png_bytes(checked)


def alpha_mask_png(image: Image.Image) -> bytes | None:
    """The image's alpha channel as a mode L PNG (0: transparent, ignored by the loss), or ``None`` for an
    image without transparency."""
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        return None
    return _png_bytes(image.convert("RGBA").getchannel("A"))


def decode_loss_mask(sample: dict[str, Any], image_size: tuple[int, int]) -> Image.Image | None:
    """The loss mask of a webdataset sample of a raw shard (mode L, the image's size), or ``None`` without one.

    Raises:
        CorruptSampleError: the ``mask.png`` member does not decode or has another mode or size (one line
            naming the shard and key).
    """
    if LOSS_MASK_KEY not in sample:
        return None
    where = f"{sample_origin(sample)}: member '{LOSS_MASK_KEY}'"
    try:
        mask = Image.open(io.BytesIO(sample[LOSS_MASK_KEY]))
        mask.load()
    except Exception as error:  # PIL raises several types for bad bytes
        raise CorruptSampleError(f"{where} does not decode as an image ({error})") from error
    return check_loss_mask(mask, image_size, where)
