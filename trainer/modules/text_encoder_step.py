"""The text encoder(s) in the training step: held by the module when they train, they encode each batch's
token ids (``lf-precompute keep_token_ids=true``) in the shards' recorded text encoding, a dropped caption
being the empty caption's ids.

:class:`TextEncoderStep` is the part of :class:`~trainer.modules.latent_diffusion.LatentDiffusion` that does
this; the encoders stay attributes of the module itself (``text_encoder``, ``text_encoder_2``: the checkpoint's
and the export's keys). How the encoders are prepared (adapters, frozen layers) and how ids are encoded lives in
:mod:`trainer.modules.text_encoder_training`.
"""

from __future__ import annotations

from typing import Any

import torch

from data_pipelines.latents.text_encoding import TextEncoding
from lf_common.errors import ConfigError
from trainer.lora.adapters import LoraSettings
from trainer.modules.text_encoder_training import (
    NO_TOKEN_IDS,
    TOKEN_IDS,
    TextEncoderParts,
    encode_batch_token_ids,
    freeze_unread_layers,
    prepare_for_training,
)


class TextEncoderStep:
    """Mixin of a LightningModule that trains the text encoder(s) on token ids.

    The module provides ``sdxl`` (whether its UNet is SDXL's), ``lora`` (the UNet's adapter settings or
    ``None``), ``hparams`` and ``training``; it calls :meth:`_init_text_encoders` in its ``__init__`` and
    :meth:`_setup_token_ids` in its ``setup`` (with ``train_text_encoder``).
    """

    sdxl: bool
    lora: LoraSettings | None
    hparams: Any
    training: bool

    def _init_text_encoders(
        self,
        train: bool,
        parts: TextEncoderParts | None,
        lora: LoraSettings | None,
        lora_2: LoraSettings | None,
    ) -> None:
        """Hold the text encoders that train (``text_encoder``, ``text_encoder_2``: the export's keys), ready to train.

        Raises:
            ConfigError: ``train`` without encoders, adapters without training, or encoders that do not fit.
        """
        if train and parts is None:
            raise ConfigError(
                "model.train_text_encoder=true needs model.text_encoders (conf/model/*.yaml: the encoders that made "
                "the shards, shard_text_encoders)"
            )
        if parts is None and (lora is not None or lora_2 is not None):
            raise ConfigError("model.text_encoder_lora trains text-encoder adapters: set model.train_text_encoder=true")
        if train and parts is not None and parts.text_encoder_2 is not None and lora_2 is None:
            lora_2 = lora  # SDXL: the second encoder's adapters as the first's
        self.train_text_encoder = train
        self.text_encoder_lora, self.text_encoder_2_lora = lora, lora_2
        if parts is not None:
            prepare_for_training(parts, self.sdxl, lora, lora_2, self.lora)
        self.text_encoder = parts.text_encoder if parts is not None else None
        self.text_encoder_2 = parts.text_encoder_2 if parts is not None else None
        self.tokenizer = parts.tokenizer if parts is not None else None
        self.tokenizer_2 = parts.tokenizer_2 if parts is not None else None
        self.hparams["trains_text_encoder"] = parts is not None
        self.text_encoding: TextEncoding | None = None  # with train_text_encoder: the shards' (in setup)
        self.uncond_token_ids: list[torch.Tensor | None] = []  # the empty caption's ids per tokenizer (in setup)

    @property
    def text_encoder_parts(self) -> TextEncoderParts | None:
        """The text encoders that train and their tokenizers (``None``: none train)."""
        if self.text_encoder is None or self.tokenizer is None:
            return None
        return TextEncoderParts(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2)

    def trained_text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders that train with the UNet: the first and, for SDXL, the second (none by default)."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def _setup_token_ids(self, datamodule: Any) -> None:
        """Take the shards' text encoding (long prompts, ``clip_skip``: as precompute encoded the captions) and the
        empty caption's ids from the data module.

        Raises:
            ConfigError: the training shards hold no token ids.
        """
        if not getattr(datamodule, "token_ids", False):
            raise ConfigError(NO_TOKEN_IDS.format(what="training"))
        manifest = getattr(datamodule, "manifest", None)
        self.text_encoding = TextEncoding.recorded(manifest.text_encoder.extra if manifest is not None else None)
        self.text_encoding.check_sdxl(self.sdxl)
        if not self.sdxl and self.text_encoder is not None:  # before the optimizer and DDP: idle layers frozen
            freeze_unread_layers(self.text_encoder, self.text_encoding.clip_skip)
        self.uncond_token_ids = [
            getattr(datamodule, "uncond_token_ids", None),
            getattr(datamodule, "uncond_token_ids_2", None),
        ]

    def encode_token_ids(self, batch: dict[str, torch.Tensor], drop: torch.Tensor | None = None) -> dict[str, Any]:
        """``batch`` with ``text`` (SDXL: and ``pooled``) from its ``token_ids`` through the training encoders
        (:func:`~trainer.modules.text_encoder_training.encode_batch_token_ids`), the ``drop`` ``(B,)`` samples'
        ids replaced by the empty caption's first.

        Raises:
            ConfigError: a batch without token ids (validation shards without them), or dropout without the empty
                caption's ids.
        """
        parts = self.text_encoder_parts
        assert parts is not None
        if TOKEN_IDS not in batch:
            raise ConfigError(NO_TOKEN_IDS.format(what="validation" if not self.training else "training"))
        if drop is not None and self.uncond_token_ids[0] is None:
            raise ConfigError(NO_TOKEN_IDS.format(what="training") + " (the empty caption's uncond.token_ids.npy)")
        encoding = self.text_encoding or TextEncoding()
        return {**batch, **encode_batch_token_ids(parts, batch, encoding, self.uncond_token_ids, drop)}
