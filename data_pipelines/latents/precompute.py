"""Precompute: raw shards -> latent shards, one output shard per input shard.

Resumable and cache-correct: each output shard is written under a temporary name and renamed when
complete, then recorded (``shard-NNNNNN.entry.json``) with its :class:`CacheKey`. A rerun reuses a
shard whose recorded key equals the current one, encodes missing ones, and refuses stale ones
(an edited input shard, another VAE, text encoder or tokenizer, other transforms) with a message
saying what changed, unless ``recompute_stale`` is set.

Encoding one shard is :mod:`data_pipelines.latents.shard_encoder`'s job. The loop over shards is
Lightning's ``Trainer.predict``: on N devices (or N CPU processes started by torchrun), rank ``r``
of ``w`` takes input shards ``r, r + w, ...`` and one writer per rank (:class:`LatentShardWriter`)
writes its output shards; rank 0 writes the manifest once every rank is done.
:func:`precompute_latents_in_process` runs the same work in the calling process alone, for callers
inside a running training job (no ``Trainer`` of its own).

Input shards and ``out_dir`` may be object-store URLs (``s3://bucket/latents``): input shards are
streamed, each output shard is written locally, uploaded whole, and only then recorded; the
manifest is written last, so a rerun after a crash reuses the uploaded, recorded shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from data_pipelines.latents.format import (
    UNCOND_POOLED_NAME,
    UNCOND_TOKEN_IDS_2_NAME,
    UNCOND_TOKEN_IDS_NAME,
    CacheKey,
    LatentManifest,
    load_entry,
    save_uncond_embedding,
    save_uncond_pooled,
    save_uncond_token_ids,
)
from data_pipelines.latents.shard_encoder import LatentShardEncoder
from data_pipelines.latents.shard_output import ShardOutput
from data_pipelines.transforms.buckets import BucketResizeCrop
from lf_common import object_store
from lf_common.errors import DataError

log = logging.getLogger(__name__)


class StaleLatentsError(DataError):
    """Latent shards whose cache key does not match the current settings."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's or object's bytes (an object is streamed, not held whole)."""
    digest = hashlib.sha256()
    with object_store.open_path(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PrecomputePlan:
    """What a run does with each of its input shards (by output name)."""

    reuse: list[str] = field(default_factory=list)
    encode: list[str] = field(default_factory=list)
    stale: dict[str, list[str]] = field(default_factory=dict)  # name -> what changed


def plan_shards(out: str | Path, names: list[str], keys: dict[str, CacheKey]) -> PrecomputePlan:
    """Sort output shards into reusable (recorded with the same key), missing, and stale."""
    plan = PrecomputePlan()
    for name in names:
        entry = load_entry(object_store.join(str(out), name))
        recorded = entry.key() if entry else None
        if entry is None:
            plan.encode.append(name)
        elif recorded == keys[name]:
            plan.reuse.append(name)
        else:
            plan.stale[name] = keys[name].differences(recorded) if recorded else ["no cache key was recorded"]
    return plan


def precompute_latents(
    shards: list[str],
    out_dir: str | Path,
    encoder: LatentShardEncoder,
    recompute_stale: bool = False,
    trainer_options: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> LatentManifest | None:
    """Encode the input shards into ``out_dir`` (same file names) with Lightning's ``Trainer.predict``;
    each rank takes whole input shards (``r, r + w, ...``) and writes its own output shards; rank 0
    writes the manifest once every rank is done.

    Args:
        shards: all raw shard paths (every rank gets the same list).
        out_dir: output folder.
        encoder: the configured encoder.
        recompute_stale: re-encode stale shards instead of refusing them.
        trainer_options: ``lightning.Trainer`` arguments (``accelerator``, ``devices``,
            ``num_nodes``, ``strategy``); default: one process on the encoders' device, or the
            layout torchrun gives (``LOCAL_WORLD_SIZE`` devices per node, DDP).
        num_workers: loader processes decoding and resizing images while the encoders run (each
            takes whole shards); 0 decodes in the main process, between encoder batches.

    Returns:
        The manifest on rank 0, ``None`` on other ranks.

    Raises:
        StaleLatentsError: some of this rank's shards are stale and ``recompute_stale`` is off.
    """
    out, names = _output_folder(shards, out_dir)
    options = {
        **launch_layout(encoder.encoders.device),
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        **(trainer_options or {}),
    }
    trainer = L.Trainer(**options, callbacks=[LatentShardWriter()])
    job = _RankShards(shards, out, encoder, recompute_stale, num_workers)
    trainer.predict(LatentEncoding(encoder), datamodule=job, return_predictions=False)
    trainer.strategy.barrier("precompute done")
    if not trainer.is_global_zero:
        return None
    return _write_manifest(out, names, encoder)


def precompute_latents_in_process(
    shards: list[str], out_dir: str | Path, encoder: LatentShardEncoder, recompute_stale: bool = False
) -> LatentManifest:
    """:func:`precompute_latents` in this process alone, with no ``Trainer`` of its own: for a caller
    inside a running training job (DreamBooth's data module encodes its few images on rank 0 while
    the other ranks wait). Same cache, same output files, same manifest.

    Raises:
        StaleLatentsError: some shards are stale and ``recompute_stale`` is off.
    """
    out, names = _output_folder(shards, out_dir)
    writer = LatentShardWriter()
    try:
        with torch.inference_mode():
            for item in _RankShards(shards, out, encoder, recompute_stale).work(rank=0, world_size=1):
                writer.take(encode_work_item(encoder, item))
    except BaseException:
        writer.abort()
        raise
    return _write_manifest(out, names, encoder)


def _output_folder(shards: list[str], out_dir: str | Path) -> tuple[str, list[str]]:
    """The output folder (created when local; a URL prefix as given) and the output shard names,
    after checking the input shards.

    Raises:
        DataError: an input shard is neither a local file nor an object-store URL, or two share a file name.
    """
    unreadable = [s for s in shards if not object_store.names_file(s)]
    if unreadable:
        raise DataError(
            "precompute reads local shard files or object-store URLs (it hashes each for the cache key); "
            f"neither: {unreadable[:3]}"
        )
    out = str(out_dir)
    object_store.make_folder(out)
    names = [object_store.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise DataError(f"input shards share file names; give shards with distinct names: {names}")
    return out, names


def launch_layout(device: torch.device) -> dict[str, Any]:
    """Trainer arguments for the processes torchrun started (one process otherwise)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "devices": local,
        "num_nodes": max(1, world // local),
        "strategy": "ddp" if world > 1 else "auto",
    }


def _as_is(item: Any) -> Any:
    return item


class _RankShards(L.LightningDataModule):
    """This rank's input shards as a stream of work items for :class:`LatentEncoding`.

    For each shard it encodes (missing, or stale with ``recompute_stale``), one item per batch of
    preprocessed samples, then an end item with the shard's skip count. Reused shards yield nothing.
    """

    def __init__(
        self, shards: list[str], out: str, encoder: LatentShardEncoder, recompute_stale: bool, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.shards = shards
        self.out = out
        self.encoder = encoder
        self.recompute_stale = recompute_stale

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # LatentShardEncoder.encode_batch moves the pixels itself

    def predict_dataloader(self) -> DataLoader:
        work = self.work(self.trainer.global_rank, self.trainer.world_size)
        self.planned = len(work.work)  # the shards this rank encodes: the progress bar's total
        workers = min(self.num_workers, len(work.work))
        return DataLoader(
            work, batch_size=None, collate_fn=_as_is, num_workers=workers, prefetch_factor=4 if workers else None
        )

    def work(self, rank: int, world_size: int) -> _WorkItems:
        """The work items of rank ``rank`` of ``world_size``: input shards ``rank, rank + world_size, ...``.

        Raises:
            StaleLatentsError: some of these shards are stale and ``recompute_stale`` is off.
        """
        mine = {object_store.basename(s): s for index, s in enumerate(self.shards) if index % world_size == rank}
        keys = {name: self.encoder.cache_key(file_sha256(source)) for name, source in mine.items()}
        plan = plan_shards(self.out, list(mine), keys)
        if plan.stale and not self.recompute_stale:
            details = "; ".join(f"{name}: {', '.join(changes)} changed" for name, changes in sorted(plan.stale.items()))
            raise StaleLatentsError(
                f"{self.out}: {len(plan.stale)} latent shard(s) do not match the current settings ({details}). "
                "Use another out_dir, or set recompute_stale=true to encode them again."
            )
        for name in plan.reuse:
            log.info("%s: complete and up to date, reused", name)
        todo = plan.encode + sorted(plan.stale)
        work = [(object_store.join(self.out, name), mine[name], keys[name]) for name in todo]
        return _WorkItems(work, self.encoder)


class _WorkItems(IterableDataset):
    """Work items for the shards ``work`` lists: ``(target, source, key)`` each."""

    def __init__(self, work: list[tuple[str, str, CacheKey]], encoder: LatentShardEncoder) -> None:
        self.work = work
        self.encoder = encoder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()  # with loader workers, each decodes whole shards: w, w + n, ...
        work = self.work if worker is None else self.work[worker.id :: worker.num_workers]
        for target, source, key in work:
            shard = {"target": target, "source": source, "key": key}
            skipped_before = self.encoder.skips.skipped
            for batch in self.encoder.preprocessed_batches(source):
                yield {**shard, "pending": batch}
            yield {**shard, "skipped": self.encoder.skips.skipped - skipped_before}


class LatentEncoding(L.LightningModule):
    """Runs the frozen encoders on work items: a batch of preprocessed samples becomes encoded
    :class:`LatentSample` s (``samples``); a shard's end item passes through.

    Args:
        encoder: the configured encoder (its VAE and text encoder(s) become this module's submodules).
    """

    def __init__(self, encoder: LatentShardEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.vae = encoder.encoders.vae
        self.text_encoder = encoder.encoders.text_encoder
        self.text_encoder_2 = encoder.encoders.text_encoder_2  # SDXL's second encoder, or None

    def predict_step(self, item: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return encode_work_item(self.encoder, item)


def encode_work_item(encoder: LatentShardEncoder, item: dict[str, Any]) -> dict[str, Any]:
    """A batch of preprocessed samples becomes encoded :class:`LatentSample` s (``samples``); a shard's
    end item passes through."""
    if "pending" not in item:
        return item
    samples = encoder.encode_batch(item["pending"])
    return {key: value for key, value in item.items() if key != "pending"} | {"samples": samples}


class LatentShardWriter(L.Callback):
    """This rank's writer: each shard goes to its own :class:`ShardOutput`, finished (renamed and
    recorded) at the shard's end item; partial shards are removed when the run fails."""

    def __init__(self) -> None:
        self.open: dict[str, ShardOutput] = {}
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0's progress bar over its own shards to encode (with an ETA)."""
        planned = getattr(trainer.datamodule, "planned", None)
        self.bar = tqdm(total=planned, desc="precompute", unit="shard", disable=not trainer.is_global_zero)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.take(prediction)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.abort()

    def take(self, prediction: dict[str, Any]) -> None:
        """Write an encoded batch to its shard's output, or finish the shard at its end item."""
        target = prediction["target"]
        if target not in self.open:
            self.open[target] = ShardOutput(target, prediction["source"], prediction["key"])
        if "samples" in prediction:
            self.open[target].write(prediction["samples"])
        else:
            self.open.pop(target).finish(prediction["skipped"])
            if self.bar is not None:
                self.bar.update()

    def abort(self) -> None:
        """Remove the partial shards of a failed run."""
        if self.bar is not None:
            self.bar.close()
        for output in self.open.values():
            output.abort()
        self.open.clear()


def _write_manifest(out: str, names: list[str], encoder: LatentShardEncoder) -> LatentManifest:
    entries = [load_entry(object_store.join(out, name)) for name in names]
    missing = [name for name, entry in zip(names, entries, strict=True) if entry is None]
    if missing:
        raise DataError(f"{out}: shards {missing[:3]} were not written by any rank")
    text_shape, uncond = encoder.text_shape_and_uncond()
    pooled_shape, uncond_pooled = encoder.pooled_shape_and_uncond()
    ids_shape, uncond_ids, uncond_ids_2 = encoder.token_ids_shape_and_uncond()
    encoders = encoder.encoders
    manifest = LatentManifest(
        resolution=encoder.transform.resolution,
        latent_shape=encoder.latent_shape(),
        text_shape=text_shape,
        vae=encoder.encoders.vae_info,
        text_encoder=encoder.encoders.text_encoder_info,
        tokenizer_path=encoder.encoders.tokenizer_path,
        transforms=encoder.transform_settings(),
        shards=entries,  # type: ignore[arg-type]
        bucket_sizes=encoder.transform.buckets.to_list() if isinstance(encoder.transform, BucketResizeCrop) else [],
        bucket_latent_shapes=encoder.bucket_latent_shapes(),
        text_encoder_2=encoders.text_encoder_2_info if encoders.sdxl else None,
        tokenizer_2_path=encoders.tokenizer_2_path,
        pooled_shape=pooled_shape,
        uncond_pooled_file=UNCOND_POOLED_NAME if encoders.sdxl else "",
        token_ids_shape=ids_shape,
        uncond_token_ids_file=UNCOND_TOKEN_IDS_NAME if uncond_ids is not None else "",
        uncond_token_ids_2_file=UNCOND_TOKEN_IDS_2_NAME if uncond_ids_2 is not None else "",
    )
    save_uncond_embedding(out, uncond)
    if uncond_pooled is not None:
        save_uncond_pooled(out, uncond_pooled)
    if uncond_ids is not None:
        save_uncond_token_ids(out, uncond_ids, uncond_ids_2)
    manifest.save(out)
    return manifest
