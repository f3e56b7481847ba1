"""The latent-shard format: the one place that defines its keys, dtypes, shapes and manifest.

A latent shard is a WebDataset tar whose samples hold::

    KEY.latent.npy   float16 (C, h, w)  VAE posterior mode times the VAE's scaling factor; (h, w) is
                                        the resolution / f, or its bucket's size / f when bucketed
    KEY.text.npy     float16 (T, D)     text encoder last hidden state of the tokenized caption
    KEY.txt          UTF-8               the caption
    KEY.json         JSON                the raw sample's metadata plus preprocessing info

and, for training an inpainting UNet (precompute with ``inpainting=true``; the manifest's
``transforms`` then hold ``inpainting_masks``, the mask settings)::

    KEY.mask.npy           float16 (1, h, w)  the sample's random mask at latent resolution (1: paint)
    KEY.masked_latent.npy  float16 (C, h, w)  latents of the image with the masked part grey (0)

and, for Stable Diffusion XL (precompute with a second text encoder; the manifest then names
``text_encoder_2`` and ``pooled_shape``)::

    KEY.text.npy     float16 (T, D1 + D2)  both encoders' penultimate hidden states, concatenated on
                                           channels (SDXL's convention: CLIP ViT-L then OpenCLIP bigG)
    KEY.pooled.npy   float16 (P,)          the second encoder's pooled, projected embedding

SDXL's micro-conditioning (``add_time_ids``) comes from ``KEY.json``, which every sample's
preprocessing fills: ``original_size`` ``[H, W]`` of the raw image, ``crop_top_left`` ``[top, left]``
of the crop in the resized image and ``target_size`` ``[h, w]`` of the encoded image (its bucket's
size, or the square resolution); :func:`micro_conditioning` reads them as SDXL's six ``time_ids``.
Integers in JSON, not float16 arrays: sizes above 2048 would round in float16.

The folder may be an object-store URL (``s3://bucket/latents``; :mod:`lf_common.object_store`): each
shard object is uploaded whole before its record, and the manifest is written last.

Next to the shards, ``manifest.json`` records the format version, the encoders (path, class,
fingerprint), the resolution and transforms, the shapes, every shard with its sample count and
the raw shard it came from (with that shard's SHA-256), and ``uncond.text.npy``: the empty
caption's embedding ``(T, D)``, used for caption dropout and classifier-free guidance. For SDXL the
unconditional embeddings are zeros, ``uncond.text.npy`` and ``uncond.pooled.npy`` ``(P,)``: SDXL's
training drops a caption by zeroing both encoders' outputs and the pooled embedding, and its
pipelines use zeros for an empty negative prompt (``force_zeros_for_empty_prompt``). With
aspect-ratio buckets (:mod:`data_pipelines.transforms.buckets`) the manifest also lists the bucket sizes
``[height, width]`` and their latent shapes, and ``KEY.json`` holds each sample's ``bucket`` index
and ``target_size``.
The writer (precompute) and the reader (training loader) both import this module.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.raw.format import sample_origin
from lf_common import object_store
from lf_common.errors import CorruptSampleError, DataError

FORMAT_NAME = "latentforge.latent-shards"
FORMAT_VERSION = 1
LATENT_KEY = "latent.npy"
TEXT_KEY = "text.npy"
CAPTION_KEY = "txt"
META_KEY = "json"
MASK_KEY = "mask.npy"
MASKED_LATENT_KEY = "masked_latent.npy"
POOLED_KEY = "pooled.npy"
MASKS_SETTING = "inpainting_masks"  # in the manifest's transforms: the shards hold the two members above
STORAGE_DTYPE = np.float16
MANIFEST_NAME = "manifest.json"
UNCOND_NAME = "uncond.text.npy"
UNCOND_POOLED_NAME = "uncond.pooled.npy"
MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")  # SDXL's time_ids, in this order


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
    """

    key: str
    latent: np.ndarray
    text: np.ndarray
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    mask: np.ndarray | None = None
    masked_latent: np.ndarray | None = None
    pooled: np.ndarray | None = None


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


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=STORAGE_DTYPE), allow_pickle=False)
    return buffer.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _payload_bytes(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) * np.dtype(STORAGE_DTYPE).itemsize


@lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact ``.npy`` header that :func:`_npy_bytes` writes for an array of ``shape``."""
    data = _npy_bytes(np.zeros(shape, dtype=STORAGE_DTYPE))
    return data[: len(data) - _payload_bytes(shape)]


def _load_npy_of_shape(data: bytes, shapes: Sequence[tuple[int, ...]] | None) -> np.ndarray:
    """Read a ``.npy`` member; skip parsing the header when it is byte for byte the one written for
    one of ``shapes`` (most of ``np.load``'s per-sample cost is parsing it). Anything else goes to ``np.load``."""
    for shape in shapes or ():
        header = _npy_header(tuple(shape))
        if data.startswith(header) and len(data) == len(header) + _payload_bytes(tuple(shape)):
            return np.frombuffer(data, dtype=STORAGE_DTYPE, offset=len(header)).reshape(shape)
    return _load_npy(data)


def encode_latent_sample(sample: LatentSample) -> dict[str, Any]:
    """The tar members of one sample (bytes), for ``webdataset.TarWriter(encoder=False)``."""
    members = {
        "__key__": sample.key,
        LATENT_KEY: _npy_bytes(sample.latent),
        TEXT_KEY: _npy_bytes(sample.text),
        CAPTION_KEY: sample.caption.encode("utf-8"),
        META_KEY: json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }
    if sample.mask is not None and sample.masked_latent is not None:
        members[MASK_KEY] = _npy_bytes(sample.mask)
        members[MASKED_LATENT_KEY] = _npy_bytes(sample.masked_latent)
    if sample.pooled is not None:
        members[POOLED_KEY] = _npy_bytes(sample.pooled)
    return members


def decode_latent_sample(
    sample: dict[str, Any],
    latent_shape: tuple[int, ...] | None = None,
    text_shape: tuple[int, ...] | None = None,
    *,
    latent_shapes: Sequence[tuple[int, ...]] | None = None,
    inpainting: bool = False,
    pooled_shape: tuple[int, ...] | None = None,
) -> LatentSample:
    """Decode one webdataset sample of a latent shard, checking shapes when given.

    Args:
        sample: the raw webdataset sample (``__key__``, ``__url__``, member bytes).
        latent_shape: the expected ``(C, h, w)``.
        text_shape: the expected ``(T, D)``.
        latent_shapes: instead of ``latent_shape``, the allowed shapes (one per bucket).
        inpainting: the sample must hold ``mask.npy`` and ``masked_latent.npy`` of its latent's size.
        pooled_shape: SDXL shards: the sample must hold ``pooled.npy`` of this shape ``(P,)``.

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
    return decoded


@dataclass
class EncoderInfo:
    """A frozen encoder the latents were made with.

    Attributes:
        path: the local folder it was loaded from.
        class_name: its class (``AutoencoderKL``, ``CLIPTextModel``, ...).
        fingerprint: SHA-256 over its config and weights.
        extra: settings that change its output (``scaling_factor``, ``max_length``).
    """

    path: str
    class_name: str
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheKey:
    """Everything a latent shard's content depends on. A shard is reused only when its key equals
    the key the current settings give; otherwise it is stale.

    Attributes:
        source_sha256: SHA-256 of the raw input shard's bytes (an edited image changes it).
        vae: fingerprint of the VAE folder (config and weights).
        text_encoder: fingerprint of the text encoder folder.
        tokenizer: fingerprint of the tokenizer folder (vocabulary, ``model_max_length``).
        transforms: preprocessing settings (resolution, crop, interpolation).
        format_version: the latent-shard format version.
        text_encoder_2: fingerprint of SDXL's second text encoder folder ("" without one).
        tokenizer_2: fingerprint of its tokenizer folder ("" without one).
        text_output: what is stored of the text encoders (``last_hidden_state``, or SDXL's
            ``penultimate+pooled``); "" in keys written before it was recorded (``last_hidden_state``).
    """

    source_sha256: str
    vae: str
    text_encoder: str
    tokenizer: str
    transforms: dict[str, Any]
    format_version: int = FORMAT_VERSION
    text_encoder_2: str = ""
    tokenizer_2: str = ""
    text_output: str = ""

    def differences(self, other: CacheKey) -> list[str]:
        """What differs from ``other`` (the key the shard was written with), in words."""
        labels = {
            "source_sha256": "the input shard's content",
            "vae": "the VAE",
            "text_encoder": "the text encoder",
            "tokenizer": "the tokenizer",
            "format_version": "the latent-shard format version",
            "text_encoder_2": "the second text encoder",
            "tokenizer_2": "the second tokenizer",
            "text_output": "the text encoders' output stored",
        }
        changed = [label for name, label in labels.items() if getattr(self, name) != getattr(other, name)]
        for setting in sorted(set(self.transforms) | set(other.transforms)):
            was, now = other.transforms.get(setting), self.transforms.get(setting)
            if was != now:
                changed.append(f"transform {setting} ({was!r} -> {now!r})")
        return changed


@dataclass
class ShardEntry:
    """One latent shard: its file name, sample count, the raw shard it came from, and its cache key."""

    name: str
    num_samples: int
    source: str
    source_sha256: str
    skipped: int = 0
    cache_key: dict[str, Any] = field(default_factory=dict)

    def key(self) -> CacheKey | None:
        """The cache key the shard was written with (``None`` for shards written without one)."""
        return CacheKey(**self.cache_key) if self.cache_key else None


ENTRY_SUFFIX = ".entry.json"


def entry_path(shard: str | Path) -> str:
    """The record written next to a complete latent shard: ``shard-000003.tar`` -> ``shard-000003.entry.json``."""
    return str(shard).removesuffix(".tar") + ENTRY_SUFFIX


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_entry(shard: str | Path, entry: ShardEntry) -> None:
    """Record a complete shard (after its tar is in place), atomically."""
    object_store.write_path(entry_path(shard), _json_bytes(asdict(entry)))


def load_entry(shard: str | Path) -> ShardEntry | None:
    """The record of a complete shard, or ``None`` when the shard or its record is missing."""
    path = entry_path(shard)
    if not (object_store.is_file(path) and object_store.is_file(shard)):
        return None
    return ShardEntry(**json.loads(object_store.read_path(path)))


@dataclass
class LatentManifest:
    """Everything a reader needs to trust and use a folder of latent shards."""

    resolution: int
    latent_shape: list[int]
    text_shape: list[int]
    vae: EncoderInfo
    text_encoder: EncoderInfo
    tokenizer_path: str
    transforms: dict[str, Any]
    shards: list[ShardEntry] = field(default_factory=list)
    bucket_sizes: list[list[int]] = field(default_factory=list)  # [height, width] pixels; empty: not bucketed
    bucket_latent_shapes: list[list[int]] = field(default_factory=list)  # [C, h, w] of each bucket
    uncond_file: str = UNCOND_NAME
    text_encoder_2: EncoderInfo | None = None  # SDXL's second text encoder (None: one text encoder)
    tokenizer_2_path: str = ""
    pooled_shape: list[int] = field(default_factory=list)  # [P] of KEY.pooled.npy; empty: no pooled embedding
    uncond_pooled_file: str = ""  # uncond.pooled.npy for SDXL shards
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        """Samples in all shards."""
        return sum(shard.num_samples for shard in self.shards)

    @property
    def inpainting(self) -> bool:
        """Whether the shards hold inpainting masks and masked-image latents."""
        return bool(self.transforms.get(MASKS_SETTING))

    @property
    def sdxl(self) -> bool:
        """Whether the shards hold SDXL's conditioning (two encoders' states, a pooled embedding, time_ids)."""
        return bool(self.pooled_shape)

    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Every latent shape a sample may have: one per bucket, or ``latent_shape`` alone."""
        return [tuple(s) for s in self.bucket_latent_shapes] or [tuple(self.latent_shape)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    def save(self, folder: str | Path) -> Path | str:
        """Write ``folder/manifest.json`` atomically; returns its path (a URL for an object-store folder)."""
        path = object_store.join(str(folder), MANIFEST_NAME)
        object_store.write_path(path, _json_bytes(self.to_dict()))
        return path if object_store.is_url(path) else Path(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> LatentManifest:
        """Build from a dict, naming the missing or wrong key.

        Raises:
            DataError: not a latent-shard manifest of this version, or a key is missing.
        """
        if data.get("format") != FORMAT_NAME:
            raise DataError(f"{where}: key 'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        if data.get("version") != FORMAT_VERSION:
            raise DataError(f"{where}: key 'version' is {data.get('version')!r}, expected {FORMAT_VERSION}")
        try:
            fields = dict(data)
            fields["vae"] = EncoderInfo(**data["vae"])
            fields["text_encoder"] = EncoderInfo(**data["text_encoder"])
            if data.get("text_encoder_2"):
                fields["text_encoder_2"] = EncoderInfo(**data["text_encoder_2"])
            fields["shards"] = [ShardEntry(**entry) for entry in data["shards"]]
            return cls(**fields)
        except KeyError as error:
            raise DataError(f"{where}: key {error} is missing") from error
        except TypeError as error:
            raise DataError(f"{where}: unexpected layout ({error})") from error

    @classmethod
    def load(cls, folder: str | Path) -> LatentManifest:
        """Read ``folder/manifest.json``.

        Raises:
            DataError: the folder or its manifest is missing or invalid.
        """
        path = object_store.join(str(folder), MANIFEST_NAME)
        fix = (
            f"give lf-precompute's out_dir, or run lf-precompute shards=<raw shards> out_dir={folder} "
            "pretrained=<model folder> first"
        )
        try:
            raw = object_store.read_path(path)
        except object_store.ObjectStoreError as error:  # names the URL, the endpoint and the reason
            raise DataError(f"{error} (the latent-shard manifest); {fix}") from error
        except FileNotFoundError as error:
            what = "the folder does not exist" if not Path(folder).is_dir() else "not a folder lf-precompute wrote"
            raise DataError(f"{path}: latent-shard manifest is missing ({what}); {fix}") from error
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(data, where=str(path))

    def check_consistent(self, folder: str | Path) -> None:
        """Every shard was made with the manifest's encoders and transforms.

        Raises:
            DataError: naming a shard whose cache key disagrees (shards mixed from two runs).
        """
        for shard in self.shards:
            key = shard.key()
            if key is None:
                continue
            second = self.text_encoder_2.fingerprint if self.text_encoder_2 else ""
            ours = (self.vae.fingerprint, self.text_encoder.fingerprint, second, self.transforms)
            if (key.vae, key.text_encoder, key.text_encoder_2, key.transforms) != ours:
                raise DataError(
                    f"{object_store.join(str(folder), shard.name)}: made with other encoders or transforms than "
                    f"{object_store.join(str(folder), MANIFEST_NAME)} names; precompute this folder again"
                )

    def shard_paths(self, folder: str | Path) -> list[str]:
        """The shard files, checked to exist.

        Raises:
            DataError: a shard the manifest lists is missing.
        """
        folder = str(folder)
        paths = [object_store.join(folder, shard.name) for shard in self.shards]
        if object_store.is_url(folder):
            present = set(object_store.list_objects(folder.rstrip("/") + "/"))  # one listing, not one request a shard
            missing = [p for p in paths if p not in present]
        else:
            missing = [p for p in paths if not Path(p).is_file()]
        manifest = object_store.join(folder, MANIFEST_NAME)
        if missing:
            raise DataError(f"{manifest}: lists shards that are missing: {missing[:3]}")
        if not paths:
            raise DataError(f"{manifest}: lists no shards")
        return paths


def save_uncond_embedding(folder: str | Path, embedding: np.ndarray) -> None:
    """Write the empty caption's embedding ``(T, D)`` as ``uncond.text.npy`` (atomically)."""
    object_store.write_path(object_store.join(str(folder), UNCOND_NAME), _npy_bytes(embedding))


def save_uncond_pooled(folder: str | Path, pooled: np.ndarray) -> None:
    """Write SDXL's unconditional pooled embedding ``(P,)`` as ``uncond.pooled.npy`` (atomically)."""
    object_store.write_path(object_store.join(str(folder), UNCOND_POOLED_NAME), _npy_bytes(pooled))


def load_uncond_pooled(folder: str | Path, manifest: LatentManifest) -> np.ndarray | None:
    """SDXL's unconditional pooled embedding ``(P,)`` float16, or ``None`` for shards without one.

    Raises:
        DataError: the manifest names a file that is missing or not of ``pooled_shape``.
    """
    if not manifest.sdxl:
        return None
    path = object_store.join(str(folder), manifest.uncond_pooled_file or UNCOND_POOLED_NAME)
    return _load_uncond(path, "unconditional pooled embedding", "pooled_shape", manifest.pooled_shape)


def load_uncond_embedding(folder: str | Path, manifest: LatentManifest) -> np.ndarray:
    """Read the empty caption's embedding ``(T, D)`` float16.

    Raises:
        DataError: the file is missing or its shape is not the manifest's ``text_shape``.
    """
    path = object_store.join(str(folder), manifest.uncond_file)
    return _load_uncond(path, "unconditional embedding", "text_shape", manifest.text_shape)


def _load_uncond(path: str, what: str, shape_key: str, shape: list[int]) -> np.ndarray:
    """The array at ``path`` (local or URL), checked against the manifest's ``shape_key``.

    Raises:
        DataError: the file is missing or of another shape.
    """
    if not object_store.is_file(path):
        raise DataError(f"{path}: {what} is missing")
    array = _load_npy(object_store.read_path(path))
    if list(array.shape) != list(shape):
        raise DataError(f"{path}: shape {list(array.shape)}, expected {shape_key} {shape}")
    return array
