"""Several latent-shard folders in one run (``data=mixed``): concept balancing with repeats or weights, and
regularization (prior-preservation) sets for any run.

Each dataset streams its own resampled shards (split by rank and worker, shuffled, decoded by its own
decoder); the streams are mixed sample by sample with a seeded draw
(:class:`~data_pipelines.shards.streaming.SeededRandomMix`) before the bucket batcher, so a bucketed batch
holds one shape. Every sample carries its ``dataset_index``; a regularization set's samples carry
``sample_weights`` = ``prior_loss_weight`` (the others 1), which the objective multiplies into their loss;
a dataset's own ``caption_dropout`` rides along as a per-sample rate.

The mixed stream is a function of the seed, the rank and the worker, so the resume of
:class:`~data_pipelines.loading.streaming_module.StreamingDataModule` (replay, skip the consumed batches) is exact;
the checkpoint records the dataset list, and a changed list starts the stream afresh with a warning.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data_pipelines.latents.format import (
    LatentManifest,
    load_uncond_embedding,
    load_uncond_pooled,
)
from data_pipelines.latents.text_encoding import TextEncoding
from data_pipelines.loading.latent_decoder import LatentCollate, LatentDecoder
from data_pipelines.loading.latent_shards import SKIP_TEXT_WITHOUT_IDS, LatentShardDataModule, uncond_token_ids
from data_pipelines.loading.ranks import world_size
from data_pipelines.loading.streaming_module import StreamingDataModule
from data_pipelines.shards.corrupt_samples import SkipCounter
from data_pipelines.shards.resumable_loader import ResumableLoader
from data_pipelines.shards.streaming import batches_per_worker, mixed_stream, sample_stages
from data_pipelines.transforms.buckets import BucketBatcher
from lf_common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: the batch keys a mixed batch adds: ``(B,)`` int64, ``(B,)`` float32, ``(B,)`` float32 (NaN: the model's)
TAG_KEYS = ("dataset_index", "sample_weights", "caption_dropout")
_ENTRY_KEYS = ("path", "name", "repeats", "weight", "is_reg", "caption_dropout")


def decoder_settings() -> tuple[str, ...]:
    """The per-dataset settings the latent decoder takes (its keyword arguments besides the manifest)."""
    parameters = inspect.signature(LatentDecoder.__init__).parameters
    return tuple(name for name in parameters if name not in ("self", "manifest"))


@dataclass
class DatasetSpec:
    """One entry of ``data.datasets``.

    Attributes:
        path: a latent-shard folder or URL (lf-precompute's ``out_dir``).
        name: the name in the logs (``train/loss_<name>``); default: the folder's last part.
        repeats: kohya's repeats: an epoch sees each of its samples this many times (on average: the
            streams are resampled); the draw is proportional to samples x repeats.
        weight: instead of repeats: the draw is proportional to the weights.
        is_reg: a regularization (prior-preservation) set: its samples weigh ``prior_loss_weight`` in the loss.
        caption_dropout: this dataset's caption dropout rate; ``None``: the model's ``caption_dropout``.
        decoder: settings for this dataset's latent decoder (``LatentDecoder``'s keyword arguments).
    """

    path: str
    name: str = ""
    repeats: int | None = None
    weight: float | None = None
    is_reg: bool = False
    caption_dropout: float | None = None
    decoder: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, index: int, entry: Mapping[str, Any]) -> DatasetSpec:
        """Read ``data.datasets[index]``.

        Raises:
            ConfigError: a key is unknown, missing or out of range (one line naming it and the fix).
        """
        where = f"data.datasets[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} is {entry!r}: give a mapping, e.g. {{path: latents/subject, repeats: 10}}")
        allowed = (*_ENTRY_KEYS, *decoder_settings())
        unknown = [key for key in entry if key not in allowed]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]} is not a dataset setting; the settings are {', '.join(allowed)}")
        if not entry.get("path"):
            raise ConfigError(f"{where}.path is missing: give the latent-shard folder (lf-precompute's out_dir)")
        if entry.get("repeats") is not None and entry.get("weight") is not None:
            raise ConfigError(f"{where} gives both repeats and weight: give one")
        repeats, weight, dropout = entry.get("repeats"), entry.get("weight"), entry.get("caption_dropout")
        if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
            raise ConfigError(f"{where}.repeats is {repeats!r}: give a whole number >= 1")
        if weight is not None and not float(weight) > 0:
            raise ConfigError(f"{where}.weight is {weight!r}: give a number > 0")
        if dropout is not None and not 0 <= float(dropout) <= 1:
            raise ConfigError(f"{where}.caption_dropout is {dropout!r}: give a rate in [0, 1]")
        path = str(entry["path"])
        return cls(
            path=path,
            name=str(entry.get("name") or _default_name(path, index)),
            repeats=repeats,
            weight=None if weight is None else float(weight),
            is_reg=bool(entry.get("is_reg", False)),
            caption_dropout=None if dropout is None else float(dropout),
            decoder={key: entry[key] for key in decoder_settings() if key in entry},
        )


def _default_name(path: str, index: int) -> str:
    """A log-friendly name from the folder's last part (``dataset<index>`` when it has none)."""
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", last) or f"dataset{index}"


def _recorded_key(manifest: LatentManifest, name: str) -> str | None:
    """A field of the cache key the folder's shards were written with (the tokenizers' fingerprints are recorded
    there only); ``None`` when no shard records a key (folders of older versions: not compared)."""
    key = next((entry.key() for entry in manifest.shards if entry.cache_key), None)
    return getattr(key, name) if key is not None else None


#: what every folder of a run must agree on: (key, label, the manifest's value), for :func:`check_compatible`
_AGREED: tuple[tuple[str, str, Any], ...] = (
    ("vae", "the VAE", lambda m: m.vae.fingerprint),
    ("text_encoder", "the text encoder", lambda m: m.text_encoder.fingerprint),
    ("text_encoder_2", "the second text encoder", lambda m: m.text_encoder_2.fingerprint if m.text_encoder_2 else ""),
    ("tokenizer", "the tokenizer", lambda m: _recorded_key(m, "tokenizer")),
    ("tokenizer_2", "the second tokenizer", lambda m: _recorded_key(m, "tokenizer_2")),
    (
        "text_encoding",
        "the text encoding (max_token_length, clip_skip)",
        lambda m: TextEncoding.recorded(m.text_encoder.extra).record(),
    ),
    ("latent_channels", "the latent channels", lambda m: m.latent_shape[0]),
    ("text_shape", "the text embedding shape", lambda m: list(m.text_shape)),
    ("sdxl", "SDXL conditioning", lambda m: m.sdxl),
    ("inpainting", "inpainting masks", lambda m: m.inpainting),
)


def check_token_ids(specs: Sequence[DatasetSpec], manifests: Sequence[LatentManifest]) -> None:
    """Every folder holds token ids when one does (a batch's samples need the same keys).

    Raises:
        DataError: one line naming a folder without ids, one with, and the fix.
    """
    holding = [index for index, manifest in enumerate(manifests) if manifest.token_ids]
    lacking = [index for index, manifest in enumerate(manifests) if not manifest.token_ids]
    if holding and lacking:
        index, other = lacking[0], holding[0]
        raise DataError(
            f"data.datasets[{index}] ({specs[index].path}) holds no token ids but data.datasets[{other}] "
            f"({specs[other].path}) does: every folder of a run must; precompute it with lf-precompute "
            f"keep_token_ids=true recompute_stale=true out_dir={specs[index].path} (the same shards and model)"
        )


def _described(manifest: LatentManifest, key: str, value: Any) -> str:
    """A field's value in an error: an encoder or tokenizer as its folder and the start of its fingerprint."""
    if key in ("vae", "text_encoder", "text_encoder_2"):
        folder = getattr(getattr(manifest, key), "path", None)
    else:
        folder = {"tokenizer": manifest.tokenizer_path, "tokenizer_2": manifest.tokenizer_2_path}.get(key)
    return f"{folder} ({str(value)[:12]})" if folder is not None else repr(value)


def check_compatible(specs: Sequence[DatasetSpec], manifests: Sequence[LatentManifest]) -> None:
    """Every folder was made with the first one's VAE, text encoder(s), tokenizer(s) and text encoding
    (``max_token_length``, ``clip_skip``), and has its latent channels, text shape, SDXL-ness and inpainting
    (resolutions may differ: batches are grouped by shape).

    Raises:
        DataError: one line naming the folder, the field, both values and the fix.
    """
    first, reference = specs[0], manifests[0]
    for index, (spec, manifest) in enumerate(zip(specs, manifests, strict=True)):
        for key, label, value in _AGREED:
            ours, theirs = value(manifest), value(reference)
            if ours is not None and theirs is not None and ours != theirs:
                settings = " ".join(f"{k}={v}" for k, v in theirs.items()) if key == "text_encoding" else ""
                made_with = f"its {settings}" if settings else "the model data.datasets[0] was made with"
                raise DataError(
                    f"data.datasets[{index}] ({spec.path}): {key} differs from data.datasets[0] ({first.path}): "
                    f"{label} {_described(manifest, key, ours)} vs {_described(reference, key, theirs)}; "
                    f"precompute it again with {made_with} (lf-precompute pretrained=<that folder> "
                    f"{settings + ' ' if settings else ''}out_dir={spec.path}), or leave it out"
                )


class _TaggedDecoder:
    """A dataset's decoder, its arrays followed by the sample's tags (picklable, runs in loader workers):
    ``dataset_index`` int64, ``sample_weights`` float32 and, with ``dropout_tag``, ``caption_dropout``
    float32 (NaN: the model's rate)."""

    def __init__(
        self, decoder: LatentDecoder, index: int, weight: float, caption_dropout: float | None, dropout_tag: bool
    ) -> None:
        self.decoder = decoder
        self.tags: tuple[np.ndarray, ...] = (np.array(index, dtype=np.int64), np.array(weight, dtype=np.float32))
        if dropout_tag:
            self.tags += (np.array(np.nan if caption_dropout is None else caption_dropout, dtype=np.float32),)

    def __call__(self, sample: dict[str, Any]) -> tuple[np.ndarray, ...]:
        return (*self.decoder(sample), *self.tags)


class MixedLatentDataModule(StreamingDataModule):
    """Streams several latent-shard folders as one training stream, mixed sample by sample.

    Batches are :class:`~data_pipelines.loading.datamodules.LatentShardDataModule`'s (``token_ids`` too when the
    folders hold them: all or none must) plus ``dataset_index``
    ``(B,)`` int64, ``sample_weights`` ``(B,)`` float32 (``prior_loss_weight`` for an ``is_reg`` set's
    samples, 1 for the others) and, when a dataset sets its own, ``caption_dropout`` ``(B,)`` float32 (NaN:
    the model's rate).

    Args:
        datasets: ``data.datasets``: entries of :class:`DatasetSpec` (``path``, ``repeats`` or ``weight``,
            ``is_reg``, ``name``, ``caption_dropout``, and the latent decoder's settings).
        prior_loss_weight: the loss weight of a regularization set's samples.
        val_dir: an optional folder for validation loss (as ``data=latents``).
        epoch_samples: the samples an epoch covers (default: the sum of samples x repeats, or of the
            samples with weights).
        train_dir: not taken (the folders are in ``datasets``); given, it is refused.
        skip_text: batch no ``text`` (nor ``pooled``): the step encodes ``token_ids`` (as ``data=latents``).
        **loader: the loader settings of ``data=latents`` (batch size, workers, shuffle buffer, seed, ...); its
            latent decoder settings (``random_flip``, ...) are every dataset's defaults.

    Raises:
        ConfigError: a bad entry, or ``train_dir`` or ``resampled=false`` given.
        DataError: a folder is missing, has no manifest, or disagrees with the first on an encoder or shape.
    """

    def __init__(
        self,
        datasets: Sequence[Mapping[str, Any]],
        prior_loss_weight: float = 1.0,
        val_dir: str | None = None,
        epoch_samples: int | None = None,
        train_dir: str | None = None,
        skip_text: bool = False,
        **loader: Any,
    ) -> None:
        defaults = {key: loader.pop(key) for key in decoder_settings() if key in loader}  # e.g. data.random_flip
        super().__init__(**loader)
        if train_dir:
            raise ConfigError("data.train_dir is set with data=mixed: put the folder in data.datasets instead")
        if not self.resampled:
            raise ConfigError("data=mixed draws from resampled shards: set data.resampled=true")
        if not datasets:
            raise ConfigError("data.datasets is empty: give at least one {path: <latent-shard folder>}")
        self.specs = [DatasetSpec.of(i, entry) for i, entry in enumerate(datasets)]
        if len({spec.weight is None for spec in self.specs}) > 1:
            raise ConfigError("data.datasets mixes weight and repeats: give every dataset a weight, or none")
        names = [spec.name for spec in self.specs]
        if len(set(names)) < len(names):
            raise ConfigError(f"data.datasets: two datasets are named alike ({names}): give each a distinct name")
        self.prior_loss_weight = prior_loss_weight
        self.manifests = [self._manifest(i, spec) for i, spec in enumerate(self.specs)]
        check_compatible(self.specs, self.manifests)
        check_token_ids(self.specs, self.manifests)
        if skip_text and not self.manifests[0].token_ids:
            raise ConfigError(SKIP_TEXT_WITHOUT_IDS.format(folder=self.specs[0].path))
        self.urls = [m.shard_paths(s.path) for s, m in zip(self.specs, self.manifests, strict=True)]
        self.decoders = [
            LatentDecoder(m, **{**defaults, **s.decoder}) for s, m in zip(self.specs, self.manifests, strict=True)
        ]
        self.loss_masks = any(decoder.loss_masks for decoder in self.decoders)  # objective.masked_loss checks it
        if self.loss_masks:  # a set without masks (e.g. regularization images) trains unmasked beside one with
            for decoder in self.decoders:
                decoder.emit_loss_masks()
        for decoder in self.decoders if skip_text else ():  # the step encodes the token ids (as data=latents)
            decoder.drop_text()
        keys = {decoder.names for decoder in self.decoders}
        if len(keys) > 1:
            raise DataError(f"data.datasets: the folders' samples have different batch keys {sorted(keys)}")
        self.probs = self.mix_probabilities()
        weighted = self.specs[0].weight is not None
        self.epoch_samples = epoch_samples or (self.num_samples if weighted else sum(self._repeated_sizes()))
        reference = self.manifests[0]
        self.manifest = reference  # the encoders all folders share (export and provenance read it)
        self.uncond_text = torch.from_numpy(load_uncond_embedding(self.specs[0].path, reference).astype(np.float32))
        pooled = load_uncond_pooled(self.specs[0].path, reference)
        self.uncond_pooled = torch.from_numpy(pooled.astype(np.float32)) if pooled is not None else None
        self.uncond_token_ids, self.uncond_token_ids_2 = uncond_token_ids(self.specs[0].path, reference)
        self.val = (
            LatentShardDataModule(self.specs[0].path, val_dir, skip_text=skip_text, **loader) if val_dir else None
        )
        log.info(
            "mixing %s",
            ", ".join(
                f"{s.name} ({p:.1%}{', reg' if s.is_reg else ''})" for s, p in zip(self.specs, self.probs, strict=True)
            ),
        )

    @staticmethod
    def _manifest(index: int, spec: DatasetSpec) -> LatentManifest:
        try:
            manifest = LatentManifest.load(spec.path)
            manifest.check_consistent(spec.path)
        except DataError as error:
            raise DataError(f"data.datasets[{index}]: {error}") from error
        return manifest

    @property
    def token_ids(self) -> bool:
        """Whether training batches carry ``token_ids`` (every folder holds token ids)."""
        return self.manifests[0].token_ids

    @property
    def num_samples(self) -> int:
        """Samples in all folders (each once)."""
        return sum(m.num_samples for m in self.manifests)

    @property
    def dataset_names(self) -> list[str]:
        """Each dataset's name, by ``dataset_index`` (the module logs ``train/loss_<name>``)."""
        return [spec.name for spec in self.specs]

    def mix_probabilities(self) -> list[float]:
        """The probability that a drawn sample comes from each dataset: proportional to samples x repeats,
        or to the weights."""
        if self.specs[0].weight is not None:
            raw = [float(spec.weight or 0) for spec in self.specs]
        else:
            raw = [float(size) for size in self._repeated_sizes()]
        total = sum(raw)
        return [r / total for r in raw]

    def _repeated_sizes(self) -> list[int]:
        """Each folder's samples x repeats."""
        return [m.num_samples * (s.repeats or 1) for s, m in zip(self.specs, self.manifests, strict=True)]

    @property
    def _dropout_tag(self) -> bool:
        return any(spec.caption_dropout is not None for spec in self.specs)

    def _tagged(self, index: int) -> _TaggedDecoder:
        spec = self.specs[index]
        weight = self.prior_loss_weight if spec.is_reg else 1.0
        return _TaggedDecoder(self.decoders[index], index, weight, spec.caption_dropout, self._dropout_tag)

    def train_dataloader(self) -> DataLoader:
        handler = SkipCounter(self.max_bad_fraction, self.bad_fraction_min_samples)
        sources = []
        for index, (urls, manifest) in enumerate(zip(self.urls, self.manifests, strict=True)):
            stages = sample_stages(
                urls,
                self._tagged(index),
                handler=handler,
                shuffle_buffer=self.shuffle_buffer,
                resampled=True,
                seed=self.seed + index,
                samples_per_shard=math.ceil(manifest.num_samples / len(urls)),
                shard_retries=self.shard_retries,
                shard_retry_delay_s=self.shard_retry_delay_s,
            )
            sources.append(wds.DataPipeline(*stages))
        # Batches of one shape (buckets, folders of other resolutions); one shape: plain batching.
        names = (*self.decoders[0].names, *(TAG_KEYS if self._dropout_tag else TAG_KEYS[:2]))
        stream = mixed_stream(
            sources,
            self.probs,
            BucketBatcher(self.batch_size, LatentCollate(names)),
            handler=handler,
            seed=self.seed,
            batches_per_epoch=batches_per_worker(self.epoch_samples, self.batch_size, world_size(), self.num_workers),
        )
        loader = ResumableLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),
        )
        loader.resume_plan = self._resume_plan
        return loader

    def val_dataloader(self) -> DataLoader | list:
        return self.val.val_dataloader() if self.val is not None else []

    def state_dict(self) -> dict[str, Any]:
        """The stream position (as ``data=latents``) and the dataset list it depends on."""
        return {**super().state_dict(), "datasets": [asdict(spec) for spec in self.specs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume where the checkpoint left the stream, unless the dataset list (or a loader setting) changed:
        then the stream starts afresh and a warning says what changed."""
        now = [asdict(spec) for spec in self.specs]
        was = state_dict.get("datasets")
        if was != now:
            log.warning(
                "data position not restored: data.datasets changed since the checkpoint (%s -> %s); the stream "
                "starts afresh",
                was,
                now,
            )
            return
        super().load_state_dict(state_dict)
