"""The prompts an evaluation generates images for: a list, a caption file, or the captions of
(held-out) raw shards; the file and the shards may be local or URLs (``s3://...``: read, streamed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data_pipelines.raw.format import CAPTION_KEY
from data_pipelines.shards.listing import resolve_shards
from data_pipelines.shards.shard_reading import raw_samples
from lf_common import object_store
from lf_common.errors import DataError


def shard_captions(shards: str | Sequence[str], limit: int | None = None) -> list[str]:
    """The captions (``KEY.txt``) of raw shards (local or URLs, streamed), in shard and key order; images
    are not decoded."""
    captions: list[str] = []
    for sample in raw_samples(resolve_shards(shards)):
        if limit is not None and len(captions) >= limit:
            break
        if CAPTION_KEY in sample:
            captions.append(sample[CAPTION_KEY].decode("utf-8").strip())
    return captions


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a prompt file: one per non-empty line, stripped; a local file or a URL (one GET).

    Raises:
        DataError: the file is missing; ObjectStoreError: the object is (one line naming it).
    """
    try:
        text = object_store.read_path(path).decode("utf-8")
    except (FileNotFoundError, IsADirectoryError) as error:
        raise DataError(f"{path}: prompt_file does not exist") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_set(
    prompts: Sequence[str] | None = None,
    prompt_file: str | Path | None = None,
    prompt_shards: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> list[str]:
    """The prompts from exactly one of ``prompts``, ``prompt_file`` (one per non-empty line; a local
    file or a URL) or ``prompt_shards`` (their captions; raw shards as :func:`resolve_shards` names them,
    local or URLs); the first ``limit`` when given.

    Raises:
        DataError: none or several sources are given, the file or object is missing (one line naming
            it), or no prompt is found.
    """
    sources = {"prompts": prompts, "prompt_file": prompt_file, "prompt_shards": prompt_shards}
    given = [name for name, value in sources.items() if value]
    if len(given) != 1:
        raise DataError(
            f"prompts: set exactly one of prompts=[...], prompt_file=PATH or prompt_shards=SHARDS "
            f"(got {', '.join(given) or 'none'})"
        )
    if prompt_file:
        found = read_prompt_file(prompt_file)
    elif prompt_shards:
        found = shard_captions(prompt_shards, limit)
    else:
        found = [str(p) for p in prompts or []]
    found = found[:limit] if limit is not None else found
    if not found:
        raise DataError(f"{given[0]}: no prompts found")
    return found
