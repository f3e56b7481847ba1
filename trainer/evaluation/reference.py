"""Reference image sets for FID and KID, and their features cached on disk.

A reference set is a folder of images, raw shards (a folder of ``.tar``, a glob or brace pattern;
``lf-shards`` output, img2dataset's), or the demo's real digits. Its images are resized (shorter
side) and center-cropped to the generated images' size before the extractor sees them. A URL
(``s3://bucket/coco-val``) names either too: raw shards are streamed, a folder of images is
downloaded once into the download cache (:mod:`lf_common.object_cache`); either has the content
hash of the same files on local disk, so both share cached features.

Features are cached like latent shards are: a cache entry is reused only when its key equals the
key the current settings give: the reference set's content (SHA-256 of every file's bytes), the
extractor's fingerprint (weights and settings) and the preprocessing. Anything else changed
means a new entry; entries are written atomically, so concurrent runs may share a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from data_pipelines.latents.precompute import file_sha256
from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.raw.sources.digits import digit_to_image, digits_split
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.shards.shard_reading import raw_samples
from data_pipelines.transforms.images import resize_and_crop
from lf_common import object_store
from lf_common.atomic import atomic_path
from lf_common.errors import CorruptSampleError, DataError
from lf_common.object_cache import cached_copy
from trainer.evaluation.distributed import all_reduce_sum, gather_rows, rank_and_world
from trainer.evaluation.features import FeatureExtractor, extract_features

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_EXPECTED = "a reference set: a folder of images, or raw shards (.tar objects) under this prefix"
CACHE_FORMAT_VERSION = 1
FEATURES_KEY = "features"


class ReferenceSet(Protocol):
    """Real images to compare generated ones with."""

    description: str

    def content_sha256(self) -> str:
        """SHA-256 over the set's content: any changed, added or removed image changes it."""

    def images(self) -> Iterator[Image.Image]:
        """The images (RGB), in a fixed order."""


class ImageFolderReference:
    """The images in a folder and its subfolders (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``),
    sorted by path.

    Args:
        folder: the local folder.
        source: what to call it in messages (the URL a downloaded copy came from; default ``folder``).
    """

    def __init__(self, folder: str | Path, source: str | None = None) -> None:
        self.folder = Path(folder)
        self.source = source or str(self.folder)
        self.paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DataError(f"{self.source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this reference folder")
        self.description = f"{self.source} ({len(self.paths)} images)"

    def content_sha256(self) -> str:
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(f"{path.relative_to(self.folder)}\0{file_sha256(path)}\n".encode())
        return digest.hexdigest()

    def images(self) -> Iterator[Image.Image]:
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    yield image.convert("RGB")
            except OSError as error:
                raise DataError(f"{path}: reference image does not decode ({error})") from error


class RawShardsReference:
    """The images of raw shards (img2dataset's layout), in shard and key order. A sample that does
    not decode is an error: a reference set should be clean (``lf-validate`` finds such samples)."""

    def __init__(self, shards: str | list[str]) -> None:
        self.shards = resolve_shards(shards)
        self.description = f"{len(self.shards)} raw shards ({self.shards[0]}, ...)"

    def content_sha256(self) -> str:
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(f"{object_store.basename(shard)}\0{file_sha256(shard)}\n".encode())
        return digest.hexdigest()

    def images(self) -> Iterator[Image.Image]:
        for sample in raw_samples(self.shards):
            try:
                yield decode_raw_sample(sample)[1]
            except CorruptSampleError as error:
                raise DataError(f"reference set: {error}; remove the sample or use another reference") from error


class DigitsReference:
    """scikit-learn's real digits of one split, at ``size`` pixels (the demo's reference).

    Args:
        split: ``"heldout"`` (default), ``"train"`` or ``"all"``.
        size: image side in pixels.
    """

    def __init__(self, split: str = "heldout", size: int = 32) -> None:
        self.split, self.size = split, size
        self.digits = digits_split(split)[0]  # type: ignore[arg-type]
        self.description = f"digits {split} split ({len(self.digits)} images, {size} px)"

    def content_sha256(self) -> str:
        return hashlib.sha256(f"digits {self.split} {self.size}".encode() + self.digits.tobytes()).hexdigest()

    def images(self) -> Iterator[Image.Image]:
        for digit in self.digits:
            yield digit_to_image(digit, self.size)


def open_reference(
    reference: str | Path | Sequence[str] | ReferenceSet, download_cache_dir: str | Path | None = None
) -> ReferenceSet:
    """A reference set from what a config names: a folder of images, raw shards (a folder of ``.tar``,
    a glob or brace pattern, a list of them), or a :class:`ReferenceSet` already built; any of the
    paths may be a URL (see :func:`remote_reference`).

    Args:
        reference: what the config names.
        download_cache_dir: where a folder of images given by URL is downloaded (``None``: the default
            download cache, ``$LF_CACHE_DIR``).
    """
    if isinstance(reference, str) and object_store.is_store(reference):
        return remote_reference(reference, download_cache_dir)
    if isinstance(reference, str | Path):
        path = Path(reference)
        if path.is_dir() and not any(path.glob("*.tar")):
            return ImageFolderReference(path)
        return RawShardsReference(str(reference))
    if isinstance(reference, Sequence):
        return RawShardsReference([str(item) for item in reference])
    return reference


def remote_reference(url: str, download_cache_dir: str | Path | None = None) -> ReferenceSet:
    """The reference set at a URL: raw shards when it names shards (a ``.tar`` object, a glob or brace
    pattern) or a prefix with ``.tar`` objects directly under it (streamed, never downloaded whole);
    otherwise the folder of images under the prefix, downloaded once into the download cache.

    Raises:
        ObjectStoreError: nothing is under the URL, or its bucket is missing (one line naming the URL).
    """
    if url.endswith(".tar") or any(ch in url for ch in "*?[{"):
        return RawShardsReference(url)
    url = url.rstrip("/")
    listed = object_store.object_infos(url, REFERENCE_EXPECTED)  # one listing; a missing prefix: one line
    if any("/" not in name and name.endswith(".tar") for name in listed):
        return RawShardsReference(url + "/")
    return ImageFolderReference(cached_copy(url, download_cache_dir, REFERENCE_EXPECTED), source=url)


@dataclass(frozen=True)
class ReferenceKey:
    """Everything cached reference features depend on.

    Attributes:
        content_sha256: the reference set's content.
        extractor: the feature extractor's fingerprint.
        preprocessing: how images are fitted to the generated size.
        format_version: the cache entry format.
    """

    content_sha256: str
    extractor: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    format_version: int = CACHE_FORMAT_VERSION

    def file_name(self) -> str:
        """The cache entry's file name: a hash of the whole key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32] + ".safetensors"


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize (shorter side, bicubic) and center-crop to ``size`` ``(height, width)``."""
    if (image.height, image.width) == tuple(size):
        return image
    return resize_and_crop(image, size[0], size[1], "center", "bicubic")[0]


@dataclass
class ReferenceFeatures:
    """A reference set's features and where they came from.

    Attributes:
        features: ``(N, D)`` float64 (of float32 values: the cache stores float32).
        key: their cache key.
        cached: whether they were read from the cache (``False``: computed now).
        path: the cache entry (``None`` without a cache folder).
    """

    features: torch.Tensor
    key: ReferenceKey
    cached: bool
    path: Path | None


def reference_features(
    reference: ReferenceSet,
    extractor: FeatureExtractor,
    size: tuple[int, int],
    cache_dir: str | Path | None,
    batch_size: int = 64,
) -> ReferenceFeatures:
    """The features of ``reference``'s images fitted to ``size``, from the cache when its key matches.

    Without a match, every rank of the process group extracts the features of its share of the
    images (image ``i`` on rank ``i % world``), the shares are gathered in order, and rank 0 writes
    the cache entry. Every rank must call this.

    Raises:
        DataError: the set has fewer than 2 images, or an image does not decode.
    """
    preprocessing = {"fit": "resize shorter side (bicubic), center crop", "size": list(size)}
    key = ReferenceKey(reference.content_sha256(), extractor.fingerprint(), preprocessing)
    path = Path(cache_dir) / key.file_name() if cache_dir else None
    if path is not None and _on_every_rank(path.is_file()):
        features = load_file(path, device=str(_device(extractor)))[FEATURES_KEY].double()
        log.info("reference features of %s: %s (cached)", reference.description, path)
        return ReferenceFeatures(features, key, True, path)
    rank, world = rank_and_world()
    count = 0

    def mine() -> Iterator[Image.Image]:
        nonlocal count
        for index, image in enumerate(reference.images()):
            count = index + 1
            if index % world == rank:
                yield fit_image(image, size)

    local = extract_features(extractor, mine(), batch_size)  # (slots of this rank, D)
    if count < 2:
        raise DataError(f"reference set {reference.description}: {count} images, need at least 2")
    features = gather_rows(local, count).float().double()  # (N, D) on every rank, as the cache stores them
    if path is not None and rank == 0:
        with atomic_path(path) as tmp:
            tensors = {FEATURES_KEY: features.float().cpu().contiguous()}
            save_file(tensors, str(tmp), metadata={"key": json.dumps(asdict(key), sort_keys=True)})
        log.info("reference features of %s: %d images -> %s", reference.description, count, path)
    return ReferenceFeatures(features, key, False, path)


def _on_every_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (another job may write the entry while the ranks look)."""
    _, world = rank_and_world()
    return int(all_reduce_sum(torch.tensor([int(flag)]))) == world


def _device(module: torch.nn.Module) -> torch.device:
    return next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
