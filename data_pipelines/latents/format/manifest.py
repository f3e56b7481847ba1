"""A latent-shard folder's records: the manifest, each complete shard's entry and cache key, and the
unconditional embeddings stored next to the shards (local folders or object-store URLs)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.latents.format.keys import (
    CAPTIONS_SETTING,
    ENTRY_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MASKS_SETTING,
    TOKEN_IDS_DTYPE,
    UNCOND_NAME,
    UNCOND_POOLED_NAME,
    UNCOND_TOKEN_IDS_2_NAME,
    UNCOND_TOKEN_IDS_NAME,
    VARIANTS_SETTING,
)
from data_pipelines.latents.format.samples import load_npy, npy_bytes
from lf_common import object_store
from lf_common.errors import DataError


@dataclass
class EncoderInfo:
    """A frozen encoder the latents were made with.

    Attributes:
        path: the folder it was loaded from (a local path, or an object-store URL).
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
    """One latent shard: its file name, sample count, the raw shard it came from, and its cache key
    (``loss_masks``: its samples with a loss mask, ``loss_mask.npy``)."""

    name: str
    num_samples: int
    source: str
    source_sha256: str
    skipped: int = 0
    cache_key: dict[str, Any] = field(default_factory=dict)
    loss_masks: int = 0

    def key(self) -> CacheKey | None:
        """The cache key the shard was written with (``None`` for shards written without one)."""
        return CacheKey(**self.cache_key) if self.cache_key else None


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
    token_ids_shape: list[int] = field(default_factory=list)  # [n, L] of KEY.token_ids.npy; empty: no token ids
    uncond_token_ids_file: str = ""  # uncond.token_ids.npy, the empty caption's ids; "": the shards hold no ids
    uncond_token_ids_2_file: str = ""  # uncond.token_ids_2.npy, SDXL shards with token ids
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
    def variant_settings(self) -> dict[str, Any] | None:
        """The image-variant settings the shards were written with (``flip``, ``crops_per_image``, ``seed``;
        :class:`~data_pipelines.transforms.augment.VariantSettings`), or ``None`` for shards without variants."""
        return self.transforms.get(VARIANTS_SETTING) or None

    @property
    def loss_masks(self) -> int:
        """Samples that hold a loss mask (``loss_mask.npy``), in all shards (0: none, masked loss has nothing
        to weigh)."""
        return sum(shard.loss_masks for shard in self.shards)

    @property
    def sdxl(self) -> bool:
        """Whether the shards hold SDXL's conditioning (two encoders' states, a pooled embedding, time_ids)."""
        return bool(self.pooled_shape)

    @property
    def caption_variants(self) -> int:
        """Caption variants stored per sample (``K`` of ``KEY.text_variants.npy``); 1: none, ``text.npy`` only."""
        return int((self.transforms.get(CAPTIONS_SETTING) or {}).get("variants", 1))

    @property
    def token_ids(self) -> bool:
        """Whether the samples hold their captions' token ids (``KEY.token_ids.npy``; precompute's
        ``keep_token_ids``), so a training step can run the text encoder on them."""
        return bool(self.uncond_token_ids_file)

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
        return object_store.as_path(path)

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
        listed = object_store.list_entries(folder)  # one listing, not one request a shard
        present = {object_store.basename(e["url"]) for e in listed if e.get("type") == "file"}
        missing = [p for p in paths if object_store.basename(p) not in present]
        manifest = object_store.join(folder, MANIFEST_NAME)
        if missing:
            raise DataError(f"{manifest}: lists shards that are missing: {missing[:3]}")
        if not paths:
            raise DataError(f"{manifest}: lists no shards")
        return paths


def save_uncond_embedding(folder: str | Path, embedding: np.ndarray) -> None:
    """Write the empty caption's embedding ``(T, D)`` as ``uncond.text.npy`` (atomically)."""
    object_store.write_path(object_store.join(str(folder), UNCOND_NAME), npy_bytes(embedding))


def save_uncond_pooled(folder: str | Path, pooled: np.ndarray) -> None:
    """Write SDXL's unconditional pooled embedding ``(P,)`` as ``uncond.pooled.npy`` (atomically)."""
    object_store.write_path(object_store.join(str(folder), UNCOND_POOLED_NAME), npy_bytes(pooled))


def load_uncond_pooled(folder: str | Path, manifest: LatentManifest) -> np.ndarray | None:
    """SDXL's unconditional pooled embedding ``(P,)`` float16, or ``None`` for shards without one.

    Raises:
        DataError: the manifest names a file that is missing or not of ``pooled_shape``.
    """
    if not manifest.sdxl:
        return None
    path = object_store.join(str(folder), manifest.uncond_pooled_file or UNCOND_POOLED_NAME)
    return _load_uncond(path, "unconditional pooled embedding", "pooled_shape", manifest.pooled_shape)


def save_uncond_token_ids(folder: str | Path, ids: np.ndarray, ids_2: np.ndarray | None = None) -> None:
    """Write the empty caption's token ids ``(n, L)`` as ``uncond.token_ids.npy`` int32 (and SDXL's second
    tokenizer's as ``uncond.token_ids_2.npy``), atomically."""
    for name, array in ((UNCOND_TOKEN_IDS_NAME, ids), (UNCOND_TOKEN_IDS_2_NAME, ids_2)):
        if array is not None:
            object_store.write_path(object_store.join(str(folder), name), npy_bytes(array, TOKEN_IDS_DTYPE))


def load_uncond_token_ids(folder: str | Path, manifest: LatentManifest) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The empty caption's token ids ``(n, L)`` int32 and SDXL's second tokenizer's (``None`` for SD 1.x/2.x);
    ``(None, None)`` for shards without token ids.

    Raises:
        DataError: the manifest names a file that is missing, not of ``token_ids_shape`` or not int32.
    """
    if not manifest.token_ids:
        return None, None
    arrays = []
    for name in (manifest.uncond_token_ids_file, manifest.uncond_token_ids_2_file if manifest.sdxl else ""):
        if not name:
            arrays.append(None)
            continue
        path = object_store.join(str(folder), name)
        array = _load_uncond(path, "the empty caption's token ids", "token_ids_shape", manifest.token_ids_shape)
        if array.dtype != TOKEN_IDS_DTYPE:
            raise DataError(f"{path}: dtype {array.dtype}, expected {np.dtype(TOKEN_IDS_DTYPE)} (token ids)")
        arrays.append(array)
    if manifest.sdxl and arrays[1] is None:
        raise DataError(
            f"{object_store.join(str(folder), MANIFEST_NAME)}: SDXL shards with token ids name no "
            "uncond_token_ids_2_file; precompute this folder again"
        )
    return arrays[0], arrays[1]


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
    array = load_npy(object_store.read_path(path))
    if list(array.shape) != list(shape):
        raise DataError(f"{path}: shape {list(array.shape)}, expected {shape_key} {shape}")
    return array
