"""One latent-shard sample: its dataclass, its tar members (encode) and their checked reading (decode),
and SDXL's micro-conditioning read from its metadata."""

from __future__ import annotations

import functools
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
    LATENT_VARIANTS_KEY,
    LOSS_MASK_KEY,
    LOSS_MASK_VARIANTS_KEY,
    MASK_KEY,
    MASKED_LATENT_KEY,
    META_KEY,
    MICRO_CONDITIONING,
    POOLED_KEY,
    POOLED_VARIANTS_KEY,
    STORAGE_DTYPE,
    TEXT_KEY,
    TEXT_VARIANTS_KEY,
    TOKEN_IDS_2_KEY,
    TOKEN_IDS_2_VARIANTS_KEY,
    TOKEN_IDS_DTYPE,
    TOKEN_IDS_KEY,
    TOKEN_IDS_VARIANTS_KEY,
    VARIANTS_META,
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
        latent_variants: ``(V, C, h, w)`` float16, shards with image variants only: the latents of the
            sample's other crops and mirror images; ``meta["variants"]`` holds each one's ``crop_top_left``
            and ``flip``, in the same order.
        loss_mask: ``(1, h, w)`` float16 in [0, 1], samples with a loss mask only (masked loss).
        loss_mask_variants: ``(V, 1, h, w)`` float16, samples with a loss mask in shards with image variants:
            the mask of each of ``latent_variants``, cropped and mirrored as its latent.
        text_variants: ``(K, T, D)`` float16, shards with caption variants only (variant 0 is ``text``).
        pooled_variants: ``(K, P)`` float16, SDXL shards with caption variants only.
        token_ids: ``(n, L)`` int32, shards with token ids only (``keep_token_ids``): the ids ``text`` was
            encoded from, ``n`` chunks of the tokenizer's ``L`` (``text_encoding.chunked_token_ids``).
        token_ids_2: ``(n, L)`` int32, SDXL shards with token ids: the second tokenizer's ids of the caption.
        token_ids_variants: ``(K, n, L)`` int32, shards with token ids and caption variants: the ids of each of
            ``text_variants`` (variant 0 is ``token_ids``).
        token_ids_2_variants: ``(K, n, L)`` int32, SDXL's second tokenizer's ids of the caption variants.
    """

    key: str
    latent: np.ndarray
    text: np.ndarray
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    mask: np.ndarray | None = None
    masked_latent: np.ndarray | None = None
    pooled: np.ndarray | None = None
    latent_variants: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    loss_mask_variants: np.ndarray | None = None
    text_variants: np.ndarray | None = None
    pooled_variants: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    token_ids_2: np.ndarray | None = None
    token_ids_variants: np.ndarray | None = None
    token_ids_2_variants: np.ndarray | None = None


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


def npy_bytes(array: np.ndarray, dtype: type[np.generic] = STORAGE_DTYPE) -> bytes:
    """``array`` as ``.npy`` bytes in ``dtype`` (the storage dtype, float16; token ids: int32), without pickling."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` array from bytes; pickled objects are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _payload_bytes(shape: tuple[int, ...], dtype: type[np.generic] = STORAGE_DTYPE) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


@lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], dtype: type[np.generic] = STORAGE_DTYPE) -> bytes:
    """The exact ``.npy`` header that :func:`npy_bytes` writes for an array of ``shape`` in ``dtype``."""
    data = npy_bytes(np.zeros(shape, dtype=dtype), dtype)
    return data[: len(data) - _payload_bytes(shape, dtype)]


def _load_npy_of_shape(
    data: bytes, shapes: Sequence[tuple[int, ...]] | None, dtype: type[np.generic] = STORAGE_DTYPE
) -> np.ndarray:
    """Read a ``.npy`` member; skip parsing the header when it is byte for byte the one written for
    one of ``shapes`` in ``dtype`` (most of ``np.load``'s per-sample cost is parsing it). Anything else goes to
    ``np.load``."""
    for shape in shapes or ():
        header = _npy_header(tuple(shape), dtype)
        if data.startswith(header) and len(data) == len(header) + _payload_bytes(tuple(shape), dtype):
            return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
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
    if sample.latent_variants is not None:
        members[LATENT_VARIANTS_KEY] = npy_bytes(sample.latent_variants)
    if sample.loss_mask is not None:
        members[LOSS_MASK_KEY] = npy_bytes(sample.loss_mask)
    if sample.loss_mask_variants is not None:
        members[LOSS_MASK_VARIANTS_KEY] = npy_bytes(sample.loss_mask_variants)
    if sample.text_variants is not None:
        members[TEXT_VARIANTS_KEY] = npy_bytes(sample.text_variants)
    if sample.pooled_variants is not None:
        members[POOLED_VARIANTS_KEY] = npy_bytes(sample.pooled_variants)
    for key, ids in (
        (TOKEN_IDS_KEY, sample.token_ids),
        (TOKEN_IDS_2_KEY, sample.token_ids_2),
        (TOKEN_IDS_VARIANTS_KEY, sample.token_ids_variants),
        (TOKEN_IDS_2_VARIANTS_KEY, sample.token_ids_2_variants),
    ):
        if ids is not None:
            members[key] = npy_bytes(ids, TOKEN_IDS_DTYPE)
    return members


def decode_latent_sample(
    sample: dict[str, Any],
    latent_shape: tuple[int, ...] | None = None,
    text_shape: tuple[int, ...] | None = None,
    *,
    latent_shapes: Sequence[tuple[int, ...]] | None = None,
    inpainting: bool = False,
    pooled_shape: tuple[int, ...] | None = None,
    latent_variants: int = 0,
    loss_masks: bool = False,
    caption_variants: int = 1,
    token_ids_shape: tuple[int, ...] | None = None,
) -> LatentSample:
    """Decode one webdataset sample of a latent shard, checking shapes when given.

    Args:
        sample: the raw webdataset sample (``__key__``, ``__url__``, member bytes).
        latent_shape: the expected ``(C, h, w)``.
        text_shape: the expected ``(T, D)``.
        latent_shapes: instead of ``latent_shape``, the allowed shapes (one per bucket).
        inpainting: the sample must hold ``mask.npy`` and ``masked_latent.npy`` of its latent's size.
        pooled_shape: SDXL shards: the sample must hold ``pooled.npy`` of this shape ``(P,)``.
        latent_variants: shards with image variants: the sample must hold ``latent_variants.npy`` of
            ``(latent_variants, C, h, w)`` (its latent's ``(C, h, w)``) and as many ``variants`` in its
            metadata; 0 (shards without them, or a reader that wants none) reads neither.
        loss_masks: read ``loss_mask.npy`` when the sample holds one: float16 ``(1, h, w)`` of its latent's
            size, values in [0, 1] (else ``loss_mask`` stays ``None``).
        caption_variants: ``K`` > 1: the sample must hold ``text_variants.npy`` ``(K, T, D)`` (and, with
            ``pooled_shape``, ``pooled_variants.npy`` ``(K, P)``); needs ``text_shape``.
        token_ids_shape: shards with token ids: the sample must hold ``token_ids.npy`` int32 of this ``(n, L)``
            (with ``pooled_shape``, SDXL's, also ``token_ids_2.npy``; with ``caption_variants`` K > 1 also
            ``token_ids_variants.npy`` ``(K, n, L)``, and SDXL's ``token_ids_2_variants.npy``); ``None`` reads none.

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
    if latent_variants:
        decoded.latent_variants = _decode_variants(sample, origin, latent_variants, arrays[LATENT_KEY].shape, meta)
    if loss_masks and LOSS_MASK_KEY in sample:
        mask_shape = (1, *arrays[LATENT_KEY].shape[1:])
        decoded.loss_mask = _checked_loss_mask(sample, LOSS_MASK_KEY, mask_shape, origin)
        if latent_variants:
            variants_shape = (latent_variants, *mask_shape)
            decoded.loss_mask_variants = _checked_loss_mask(sample, LOSS_MASK_VARIANTS_KEY, variants_shape, origin)
    if caption_variants > 1:
        if text_shape is None:
            raise ValueError("caption_variants needs text_shape")
        count = caption_variants
        decoded.text_variants = _variant_member(sample, TEXT_VARIANTS_KEY, (count, *text_shape), origin)
        if pooled_shape is not None:
            decoded.pooled_variants = _variant_member(sample, POOLED_VARIANTS_KEY, (count, *pooled_shape), origin)
    if token_ids_shape is not None:
        _decode_token_ids(decoded, sample, tuple(token_ids_shape), pooled_shape is not None, caption_variants, origin)
    return decoded


def _decode_token_ids(
    decoded: LatentSample, sample: dict[str, Any], shape: tuple[int, ...], sdxl: bool, variants: int, origin: str
) -> None:
    """Fill ``decoded``'s token ids ``(n, L)`` int32 (SDXL's second ones too, and ``(K, n, L)`` with caption
    variants) from ``sample``'s members.

    Raises:
        CorruptSampleError: a member is missing, does not parse, or has another shape or dtype.
    """
    why = "the manifest records token ids"
    read = functools.partial(_checked_member, sample, origin=origin, why=why, dtype=TOKEN_IDS_DTYPE)
    decoded.token_ids = read(TOKEN_IDS_KEY, shape)
    if sdxl:
        decoded.token_ids_2 = read(TOKEN_IDS_2_KEY, shape)
    if variants > 1:
        decoded.token_ids_variants = read(TOKEN_IDS_VARIANTS_KEY, (variants, *shape))
        if sdxl:
            decoded.token_ids_2_variants = read(TOKEN_IDS_2_VARIANTS_KEY, (variants, *shape))


def _decode_variants(
    sample: dict[str, Any], origin: str, count: int, latent_shape: tuple[int, ...], meta: dict[str, Any]
) -> np.ndarray:
    """``latent_variants.npy`` ``(count, C, h, w)`` of a sample, checked with its metadata's ``variants``.

    Raises:
        CorruptSampleError: the member is missing or of another shape or dtype, or the metadata does not
            list one entry per variant.
    """
    array = _checked_member(sample, LATENT_VARIANTS_KEY, (count, *latent_shape), origin, "a shard with image variants")
    listed = meta.get(VARIANTS_META)
    if not isinstance(listed, list) or len(listed) != count:
        raise CorruptSampleError(
            f"{origin}: metadata '{VARIANTS_META}' is {listed!r:.80}, expected a list of {count} crop/flip entries"
        )
    return array


def _checked_loss_mask(sample: dict[str, Any], key: str, shape: tuple[int, ...], origin: str) -> np.ndarray:
    """A loss-mask member ``key``: float16 of ``shape`` (``(1, h, w)`` for a latent ``(C, h, w)``, or
    ``(V, 1, h, w)`` for its variants), values in [0, 1].

    Raises:
        CorruptSampleError: it is missing, does not parse, or has another dtype, shape or range.
    """
    mask = _checked_member(sample, key, shape, origin, "a sample with a loss mask and image variants")
    if not (np.all(mask >= 0) and np.all(mask <= 1)):  # also refuses NaN
        raise CorruptSampleError(f"{origin}: member '{key}' has values outside [0, 1]")
    return mask


def _variant_member(sample: dict[str, Any], key: str, shape: tuple[int, ...], origin: str) -> np.ndarray:
    """A caption-variant member of exactly ``shape`` in the storage dtype (see :func:`_checked_member`)."""
    return _checked_member(sample, key, shape, origin, "the manifest records caption variants")


def _checked_member(
    sample: dict[str, Any],
    key: str,
    shape: tuple[int, ...],
    origin: str,
    why: str,
    dtype: type[np.generic] = STORAGE_DTYPE,
) -> np.ndarray:
    """The ``.npy`` member ``key`` of a sample, exactly ``shape`` in ``dtype`` (the storage dtype by default).

    Args:
        why: why the member must be there (said when it is missing).

    Raises:
        CorruptSampleError: it is missing, does not parse, or has another shape or dtype.
    """
    if key not in sample:
        raise CorruptSampleError(f"{origin}: member '{key}' is missing ({why})")
    try:
        array = _load_npy_of_shape(sample[key], [shape], dtype)
    except Exception as error:
        raise CorruptSampleError(f"{origin}: member '{key}' is not a .npy array ({error})") from error
    if array.dtype != dtype or tuple(array.shape) != shape:
        found, expected = f"{array.dtype} {tuple(array.shape)}", f"{np.dtype(dtype)} {shape}"
        raise CorruptSampleError(f"{origin}: member '{key}' is {found}, expected {expected} ({why})")
    return array
