"""Find duplicate images in raw shards and write the shards without them.

Duplicated training images are what diffusion models memorise and reproduce (Carlini et al. 2023,
"Extracting Training Data from Diffusion Models"; Somepalli et al. 2023, "Diffusion Art or
Digital Forgery?"). Three kinds are found:

- **exact**: the same pixels (SHA-256 of the decoded image), whatever the file bytes.
- **near**: re-encoded, resized, slightly shifted copies. Candidates come from a perceptual hash
  (``imagehash.phash``, 64 bits) of a 32 x 32 grayscale thumbnail, searched within
  ``max_hash_distance`` bits with faiss; each image is also hashed shifted by up to ``shift``
  thumbnail pixels, since a DCT hash is not shift invariant. A candidate counts only when the
  two thumbnails, best aligned within ``shift`` pixels, differ by at most ``max_pixel_difference``
  (mean absolute difference, 0-1): similar-looking but distinct images (two handwritten sevens)
  can share a hash, never a thumbnail.
- **embedding** (optional): cosine similarity of image embeddings (e.g. CLIP's) of at least
  ``min_cosine``, by faiss inner-product range search: semantic near copies (crops, edits).

Each group keeps its first sample in shard and key order and drops the rest. Hashing streams each
shard once (shards in parallel processes); the search holds about 1 KB per sample (hashes and the
thumbnail); writing streams the shards again, copying the kept samples' members as they are. Input
shards may be URLs (streamed); an ``out_dir`` URL gets each shard uploaded whole once complete
(:class:`~data_pipelines.shards.tar_writer.AtomicShardWriter`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import imagehash
import numpy as np
import webdataset as wds
from PIL import Image

from data_pipelines.raw.format import decode_raw_sample
from data_pipelines.shards.shard_reading import raw_samples
from data_pipelines.shards.tar_writer import AtomicShardWriter
from lf_common import object_store
from lf_common.errors import CorruptSampleError, DataError

log = logging.getLogger(__name__)
THUMBNAIL = 32
HASH_BITS = 64

Embedder = Callable[[list[Image.Image]], np.ndarray]
"""Images -> embeddings ``(B, D)`` (for the optional cosine-similarity search)."""


@dataclass
class Signatures:
    """What the search needs of one shard's samples (``N`` samples, ``V = (2 * shift + 1)^2`` shifts).

    Attributes:
        shard: the shard path.
        keys: the sample keys, in order.
        pixels: SHA-256 of each decoded image (mode, size, pixels).
        hashes: ``(N, V, 8)`` uint8: the 64-bit pHash of each thumbnail shifted by each offset
            (offset ``(0, 0)`` first).
        thumbnails: ``(N, 32, 32)`` uint8 grayscale.
    """

    shard: str
    keys: list[str]
    pixels: list[str]
    hashes: np.ndarray
    thumbnails: np.ndarray


def shifts(shift: int) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` within ``shift`` pixels, ``(0, 0)`` first."""
    around = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1) if (dy, dx) != (0, 0)]
    return [(0, 0), *around]


def thumbnail(image: Image.Image) -> np.ndarray:
    """``(32, 32)`` uint8 grayscale, the whole image squeezed (no crop: a resized copy matches)."""
    return np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR), dtype=np.uint8)


def _phash(thumb: np.ndarray) -> np.ndarray:
    return np.packbits(imagehash.phash(Image.fromarray(thumb)).hash.flatten())  # (8,) uint8


def shard_samples(shard: str) -> wds.DataPipeline:
    """The raw samples of one shard (``__key__`` and member bytes), in order; a URL is streamed."""
    return raw_samples([shard])


def shard_signatures(shard: str, shift: int = 1) -> Signatures:
    """Hash every image of one raw shard (runs in worker processes).

    Raises:
        DataError: a sample does not decode (``lf-validate`` lists such samples).
    """
    keys, pixels, hashes, thumbs = [], [], [], []
    offsets = shifts(shift)
    for sample in shard_samples(shard):
        try:
            key, image, _, _ = decode_raw_sample(sample)
        except CorruptSampleError as error:
            raise DataError(f"{error}; dedup needs every image: find them with lf-validate, drop them first") from error
        digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
        thumb = thumbnail(image)
        keys.append(key)
        pixels.append(digest.hexdigest())
        thumbs.append(thumb)
        hashes.append(np.stack([_phash(np.roll(thumb, offset, axis=(0, 1))) for offset in offsets]))
    empty = (0, len(offsets), HASH_BITS // 8)
    return Signatures(
        shard,
        keys,
        pixels,
        np.stack(hashes) if hashes else np.zeros(empty, np.uint8),
        np.stack(thumbs) if thumbs else np.zeros((0, THUMBNAIL, THUMBNAIL), np.uint8),
    )


def aligned_difference(a: np.ndarray, b: np.ndarray, shift: int) -> float:
    """Mean absolute difference (0-1) of two thumbnails, at the best offset within ``shift`` pixels."""
    a, b = a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0
    return min(float(np.abs(np.roll(a, offset, axis=(0, 1)) - b).mean()) for offset in shifts(shift))


@dataclass
class Link:
    """Why sample ``other`` duplicates sample ``first`` (indices into the samples of all shards)."""

    first: int
    other: int
    reason: str  # "exact" | "near" | "embedding"
    value: float | None = None  # near: thumbnail difference; embedding: cosine similarity


def _exact_links(pixels: Sequence[str]) -> list[Link]:
    first_of: dict[str, int] = {}
    links = []
    for index, digest in enumerate(pixels):
        if digest in first_of:
            links.append(Link(first_of[digest], index, "exact"))
        else:
            first_of[digest] = index
    return links


def _pairs(limits: np.ndarray, found: np.ndarray) -> np.ndarray:
    """A range search's results as ``(first, other)`` pairs ``(P, 2)``, ``first < other``."""
    limits, found = limits.astype(np.int64), found.astype(np.int64)
    queries = np.repeat(np.arange(len(limits) - 1), np.diff(limits))
    keep = queries != found
    return np.stack([np.minimum(queries, found), np.maximum(queries, found)], axis=1)[keep].astype(np.int64)


def _near_links(
    hashes: np.ndarray, thumbs: np.ndarray, pixels: Sequence[str], max_distance: int, max_difference: float, shift: int
) -> list[Link]:
    """Pairs within ``max_distance`` hash bits at some shift (faiss), confirmed on aligned thumbnails."""
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(np.ascontiguousarray(hashes[:, 0]))
    pairs = [np.zeros((0, 2), np.int64)]
    for variant in range(hashes.shape[1]):
        limits, _, found = index.range_search(np.ascontiguousarray(hashes[:, variant]), max_distance + 1)
        pairs.append(_pairs(limits, found))
    links = []
    for first, other in np.unique(np.concatenate(pairs), axis=0).tolist():
        if pixels[first] == pixels[other]:
            continue  # exact already
        difference = aligned_difference(thumbs[first], thumbs[other], shift)
        if difference <= max_difference:
            links.append(Link(first, other, "near", round(difference, 5)))
    return links


def _embedding_links(embeddings: np.ndarray, min_cosine: float) -> list[Link]:
    """Pairs whose embeddings' cosine similarity is at least ``min_cosine`` (faiss inner-product range search)."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    limits, _, found = index.range_search(vectors, min_cosine)
    pairs = np.unique(_pairs(limits, found), axis=0)
    return [
        Link(first, other, "embedding", round(float(vectors[first] @ vectors[other]), 5))
        for first, other in pairs.tolist()
    ]


def group_links(count: int, links: Sequence[Link]) -> list[tuple[int, list[Link]]]:
    """Connected groups of linked samples: ``(kept, [how each other member was reached])``, the kept
    sample the group's first; groups in the order of their kept sample."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for link in links:
        a, b = root(link.first), root(link.other)
        parent[max(a, b)] = min(a, b)
    neighbours: dict[int, list[Link]] = {}
    for link in links:
        neighbours.setdefault(link.first, []).append(link)
        neighbours.setdefault(link.other, []).append(link)
    groups = []
    for kept in sorted({root(i) for i in neighbours}):
        reached, frontier, trail = {kept}, [kept], []
        while frontier:  # breadth first from the kept sample: each member by its first link
            current = frontier.pop(0)
            for link in sorted(neighbours[current], key=lambda l: (l.first, l.other)):  # noqa: E741
                other = link.other if link.first == current else link.first
                if other not in reached:
                    reached.add(other)
                    frontier.append(other)
                    trail.append(Link(current, other, link.reason, link.value))
        groups.append((kept, sorted(trail, key=lambda l: l.other)))  # noqa: E741
    return groups


@dataclass
class DedupReport:
    """What a dedup run found and wrote.

    Attributes:
        samples: samples read.
        kept: samples written.
        dropped: samples left out (``exact``, ``near``, ``embedding`` counts in ``by_reason``).
        by_reason: dropped samples per reason.
        groups: each group's kept sample (``shard:key``) and its duplicates with why.
        settings: the search settings.
        shards: the shards written (empty in a dry run).
    """

    samples: int = 0
    kept: int = 0
    dropped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _embeddings(shards: Sequence[str], embed: Embedder, batch_size: int) -> np.ndarray:
    rows, batch = [], []
    for shard in shards:
        for sample in shard_samples(shard):
            batch.append(decode_raw_sample(sample)[1])
            if len(batch) == batch_size:
                rows.append(embed(batch))
                batch = []
    if batch:
        rows.append(embed(batch))
    return np.concatenate(rows)


def find_duplicates(
    shards: Sequence[str],
    max_hash_distance: int = 8,
    max_pixel_difference: float = 0.02,
    shift: int = 1,
    embed: Embedder | None = None,
    min_cosine: float = 0.95,
    workers: int = 1,
    batch_size: int = 64,
) -> tuple[list[tuple[str, str]], list[tuple[int, list[Link]]]]:
    """Every sample's ``(shard, key)`` and the duplicate groups among them.

    Args:
        shards: raw shard paths.
        max_hash_distance: pHash bits (of 64) two candidates may differ by.
        max_pixel_difference: the largest aligned thumbnail difference (0-1) of a near duplicate.
        shift: thumbnail pixels (of 32) a near duplicate may be shifted by.
        embed: images -> embeddings, for the cosine-similarity search (``None``: off).
        min_cosine: the smallest cosine similarity of an embedding duplicate.
        workers: processes hashing shards in parallel.
        batch_size: images per ``embed`` call.
    """
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            signatures = list(pool.map(shard_signatures, shards, [shift] * len(shards)))
    else:
        signatures = [shard_signatures(shard, shift) for shard in shards]
    samples = [(s.shard, key) for s in signatures for key in s.keys]
    if not samples:
        raise DataError(f"{shards[0] if shards else 'shards'}: no samples to deduplicate")
    pixels = [digest for s in signatures for digest in s.pixels]
    hashes = np.concatenate([s.hashes for s in signatures])
    thumbs = np.concatenate([s.thumbnails for s in signatures])
    links = _exact_links(pixels)
    links += _near_links(hashes, thumbs, pixels, max_hash_distance, max_pixel_difference, shift)
    if embed is not None:
        links += _embedding_links(_embeddings(shards, embed, batch_size), min_cosine)
    return samples, group_links(len(samples), links)


def write_without(
    shards: Sequence[str],
    dropped: set[tuple[str, str]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
) -> list[str]:
    """Copy every sample of ``shards`` but the ``dropped`` ``(shard, key)`` pairs into new shards
    (members byte for byte, keys kept); returns the shard paths written."""
    writer = AtomicShardWriter(out_dir, samples_per_shard, prefix, overwrite)
    with writer:
        for shard in shards:
            for sample in shard_samples(shard):
                if (shard, sample["__key__"]) not in dropped:
                    writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    return [str(s.path) for s in writer.shards]


def shard_folder(shard: str) -> str:
    """The folder a shard lies in (resolved), or the prefix of a URL (without its last ``/``)."""
    return object_store.canonical(object_store.parent(shard))


def _location(folder: str | Path) -> str:
    """A folder resolved, or a URL prefix without a trailing ``/``: comparable with :func:`shard_folder`."""
    return object_store.canonical(folder)


def dedup_shards(
    shards: Sequence[str],
    out_dir: str | Path | None,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
    **search: Any,
) -> DedupReport:
    """Find the duplicate groups of ``shards`` (:func:`find_duplicates` ``**search``) and, unless
    ``out_dir`` is ``None`` (a dry run), write the shards without the dropped samples."""
    if out_dir is not None and any(shard_folder(shard) == _location(out_dir) for shard in shards):
        raise DataError(f"{out_dir}: out_dir holds the input shards; write the deduplicated shards to another folder")
    samples, groups = find_duplicates(shards, **search)
    name = [f"{object_store.basename(shard)}:{key}" for shard, key in samples]
    report = DedupReport(samples=len(samples), settings={k: v for k, v in search.items() if k != "embed"})
    report.settings["embedding"] = search.get("embed") is not None
    for kept, trail in groups:
        members = [
            {"sample": name[link.other], "reason": link.reason, "value": link.value}
            | ({"matched": name[link.first]} if link.first != kept else {})
            for link in trail
        ]
        report.groups.append({"kept": name[kept], "duplicates": members})
        for link in trail:
            report.by_reason[link.reason] = report.by_reason.get(link.reason, 0) + 1
    dropped = {samples[link.other] for _, trail in groups for link in trail}
    report.dropped, report.kept = len(dropped), len(samples) - len(dropped)
    if out_dir is not None:
        report.shards = write_without(shards, dropped, out_dir, samples_per_shard, prefix, overwrite)
    log.info("dedup: %d samples, %d dropped in %d groups %s", len(samples), len(dropped), len(groups), report.by_reason)
    return report
