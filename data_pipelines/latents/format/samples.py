"""One latent-shard sample: its dataclass, its tar members (encode) and their checked reading (decode),
and SDXL's micro-conditioning read from its metadata."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from data_pipelines.latents.format.keys import (
    CAPTION_KEY,
    LATENT_KEY,
    MASK_KEY,
    MASKED_LATENT_KEY,
    META_KEY,
    MICRO_CONDITIONING,
    POOLED_KEY,
    POOLED_VARIANTS_KEY,
    STORAGE_DTYPE,
    TEXT_KEY,
    TEXT_VARIANTS_KEY,
)
from data_pipelines.raw.format import sample_origin
from lf_common.errors import CorruptSampleError


@dataclass
class LatentSample:
    """One decoded latent-shard sample.

    Attributes:
        key: the sample key.
        latent: ``(C, h, w)`` float16.
        text: ``(T, D)`` float16.
        caption: the caption.
        meta: metadata.
        mask: ``(1, h, w)`` float16, inpainting shards only.
        masked_latent: ``(C, h, w)`` float16, inpainting shards only.
        pooled: ``(P,)`` float16, SDXL shards only (the second text encoder's pooled embedding).
        text_variants: ``(K, T, D)`` float16, shards with caption variants only (variant 0 is ``text``).
        pooled_variants: ``(K, P)`` float16, SDXL shards with caption variants only.
    """

    key: str
    latent: np.ndarray
    text: np.ndarray
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    mask: np.ndarray | None = None
    masked_latent: np.ndarray | None = None
    pooled: np.ndarray | None = None
    text_variants: np.ndarray | None = None
    pooled_variants: np.ndarray | None = None


def micro_conditioning(meta: dict[str, Any], origin: str = "sample") -> np.ndarray:
    """SDXL's ``time_ids`` of one sample: ``original_size + crop_top_left + target_size`` from its metadata.

    Shards written before ``target_size`` was recorded for square crops have ``resolution`` instead.

    Returns:
        ``(6,)`` int64: ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``.

    Raises:
        CorruptSampleError: a value is missing or is not two integers.
    """
    meta = dict(meta)
    if "target_size" not in meta and "resolution" in meta:
        meta["target_size"] = [meta["resolution"], meta["resolution"]]
    values: list[int] = []
    for name in MICRO_CONDITIONING:
        pair = meta.get(name)
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(v, int) for v in pair):
            raise CorruptSampleError(f"{origin}: metadata '{name}' is {pair!r}, expected [int, int] (SDXL time_ids)")
        values += pair
    return np.asarray(values, dtype=np.int64)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` bytes in the storage dtype (float16), without pickling."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=STORAGE_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` array from bytes; pickled objects are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _payload_bytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * np.dtype(STORAGE_DTYPE).itemsize


@lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact ``.npy`` header that :func:`npy_bytes` writes for an array of ``shape``."""
    data = npy_bytes(np.zeros(shape, dtype=STORAGE_DTYPE))
    return data[: len(data) - _payload_bytes(shape)]


def _load_npy_of_shape(data: bytes, shapes: Sequence[tuple[int, ...]] | None) -> np.ndarray:
    """Read a ``.npy`` member; skip parsing the header when it is byte for byte the one written for
    one of ``shapes`` (most of ``np.load``'s per-sample cost is parsing it). Anything else goes to ``np.load``."""
    for shape in shapes or ():
        header = _npy_header(tuple(shape))
        if data.startswith(header) and len(data) == len(header) + _payload_bytes(tuple(shape)):
            return np.frombuffer(data, dtype=STORAGE_DTYPE, offset=len(header)).reshape(shape)
    return load_npy(data)


def encode_latent_sample(sample: LatentSample) -> dict[str, Any]:
    """The tar members of one sample (bytes), for ``webdataset.TarWriter(encoder=False)``."""
    members = {
        "__key__": sample.key,
        LATENT_KEY: npy_bytes(sample.latent),
        TEXT_KEY: npy_bytes(sample.text),
        CAPTION_KEY: sample.caption.encode("utf-8"),
        META_KEY: json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }
    if sample.mask is not None and sample.masked_latent is not None:
        members[MASK_KEY] = npy_bytes(sample.mask)
        members[MASKED_LATENT_KEY] = npy_bytes(sample.masked_latent)
    if sample.pooled is not None:
        members[POOLED_KEY] = npy_bytes(sample.pooled)
    if sample.text_variants is not None:
        members[TEXT_VARIANTS_KEY] = npy_bytes(sample.text_variants)
    if sample.pooled_variants is not None:
        members[POOLED_VARIANTS_KEY] = npy_bytes(sample.pooled_variants)
    return members


def decode_latent_sample(
    sample: dict[str, Any],
    latent_shape: tuple[int, ...] | None = None,
    text_shape: tuple[int, ...] | None = None,
    *,
    latent_shapes: Sequence[tuple[int, ...]] | None = None,
    inpainting: bool = False,
    pooled_shape: tuple[int, ...] | None = None,
    caption_variants: int = 1,
) -> LatentSample:
    """Decode one webdataset sample of a latent shard, checking shapes when given.

    Args:
        sample: the raw webdataset sample (``__key__``, ``__url__``, member bytes).
        latent_shape: the expected ``(C, h, w)``.
        text_shape: the expected ``(T, D)``.
        latent_shapes: instead of ``latent_shape``, the allowed shapes (one per bucket).
        inpainting: the sample must hold ``mask.npy`` and ``masked_latent.npy`` of its latent's size.
        pooled_shape: SDXL shards: the sample must hold ``pooled.npy`` of this shape ``(P,)``.
        caption_variants: ``K`` > 1: the sample must hold ``text_variants.npy`` ``(K, T, D)`` (and, with
            ``pooled_shape``, ``pooled_variants.npy`` ``(K, P)``); needs ``text_shape``.

    Raises:
        CorruptSampleError: a member is missing, does not parse, or has the wrong shape or dtype.
    """
    origin = sample_origin(sample)
    allowed_latent = (
        [tuple(s) for s in latent_shapes] if latent_shapes else ([tuple(latent_shape)] if latent_shape else None)
    )
    allowed_text = [tuple(text_shape)] if text_shape else None
    arrays = {}
    for key, shapes in ((LATENT_KEY, allowed_latent), (TEXT_KEY, allowed_text)):
        if key not in sample:
            raise CorruptSampleError(f"{origin}: member '{key}' is missing")
        try:
            array = _load_npy_of_shape(sample[key], shapes)
        except Exception as error:
            raise CorruptSampleError(f"{origin}: member '{key}' is not a .npy array ({error})") from error
        if array.dtype != STORAGE_DTYPE or (shapes is not None and tuple(array.shape) not in shapes):
            expected = " or ".join(str(s) for s in shapes) if shapes else "any shape"
            found = f"{array.dtype} {tuple(array.shape)}"
            raise CorruptSampleError(
                f"{origin}: member '{key}' is {found}, expected {np.dtype(STORAGE_DTYPE)} {expected}"
            )
        arrays[key] = array
    caption = sample[CAPTION_KEY].decode("utf-8") if CAPTION_KEY in sample else ""
    meta = json.loads(sample[META_KEY]) if META_KEY in sample else {}
    decoded = LatentSample(sample["__key__"], arrays[LATENT_KEY], arrays[TEXT_KEY], caption, meta)
    if inpainting:
        channels, h, w = arrays[LATENT_KEY].shape
        for key, shape in ((MASK_KEY, (1, h, w)), (MASKED_LATENT_KEY, (channels, h, w))):
            if key not in sample:
                raise CorruptSampleError(f"{origin}: member '{key}' is missing (an inpainting shard)")
            array = _load_npy_of_shape(sample[key], [shape])
            if array.dtype != STORAGE_DTYPE or tuple(array.shape) != shape:
                raise CorruptSampleError(f"{origin}: member '{key}' is {array.dtype} {array.shape}, expected {shape}")
        decoded.mask = _load_npy_of_shape(sample[MASK_KEY], [(1, h, w)])
        decoded.masked_latent = _load_npy_of_shape(sample[MASKED_LATENT_KEY], [(channels, h, w)])
    if pooled_shape is not None:
        if POOLED_KEY not in sample:
            raise CorruptSampleError(f"{origin}: member '{POOLED_KEY}' is missing (an SDXL shard)")
        pooled = _load_npy_of_shape(sample[POOLED_KEY], [tuple(pooled_shape)])
        if pooled.dtype != STORAGE_DTYPE or tuple(pooled.shape) != tuple(pooled_shape):
            raise CorruptSampleError(
                f"{origin}: member '{POOLED_KEY}' is {pooled.dtype} {pooled.shape}, expected {tuple(pooled_shape)}"
            )
        decoded.pooled = pooled
    if caption_variants > 1:
        if text_shape is None:
            raise ValueError("caption_variants needs text_shape")
        count = caption_variants
        decoded.text_variants = _variant_member(sample, TEXT_VARIANTS_KEY, (count, *text_shape), origin)
        if pooled_shape is not None:
            decoded.pooled_variants = _variant_member(sample, POOLED_VARIANTS_KEY, (count, *pooled_shape), origin)
    return decoded


def _variant_member(sample: dict[str, Any], key: str, shape: tuple[int, ...], origin: str) -> np.ndarray:
    """A caption-variant member of exactly ``shape`` in the storage dtype.

    Raises:
        CorruptSampleError: it is missing, does not parse, or has another shape or dtype.
    """
    if key not in sample:
        raise CorruptSampleError(f"{origin}: member '{key}' is missing (the manifest records caption variants)")
    try:
        array = _load_npy_of_shape(sample[key], [shape])
    except Exception as error:
        raise CorruptSampleError(f"{origin}: member '{key}' is not a .npy array ({error})") from error
    if array.dtype != STORAGE_DTYPE or tuple(array.shape) != shape:
        found, expected = f"{array.dtype} {tuple(array.shape)}", f"{np.dtype(STORAGE_DTYPE)} {shape}"
        raise CorruptSampleError(f"{origin}: member '{key}' is {found}, expected {expected}")
    return array
