"""Textual inversion (Gal et al. 2022): new tokens' embedding rows train through the frozen text encoder(s)
and the frozen UNet, on latent shards; with ``model.lora``, pivotal tuning: the UNet's LoRA adapters train
with the rows, which stop after ``train_fraction`` of the steps (diffusers'
``train_dreambooth_lora_sdxl_advanced.py``).

The latents come from the shards; the text cannot (the shards hold embeddings of captions without the new
tokens), so each step fills the templates with the tokens (or takes each sample's caption,
:class:`~trainer.textual_inversion.data.CaptionedLatentDataModule`) and encodes them
(:func:`~trainer.modules.prompt_encoding.encode_prompts_in_step`, shared with DreamBooth). For SDXL both
encoders get the tokens (rows for CLIP ViT-L and OpenCLIP bigG, trained together).

Only :class:`~trainer.textual_inversion.new_tokens.NewTokenEmbedding`'s rows (and the adapters, when there are)
are parameters the optimizer holds (the rows: the ``embeddings`` group, ``optim.embedding_lr``,
``optim.embedding_weight_decay``), so no other weight changes, whatever the optimizer. The encoders are held as
``text_encoders.0/1`` (not ``text_encoder.``, the keys of encoders DreamBooth trains), so an export takes the base
encoders as they are and writes the embeddings beside them (:func:`learned_embeddings`, ``embeddings/``); the
record's ``text_encoder_keys`` tells it where the encoders' adapters are. At the end of the run the embeddings are
written to ``<output_dir>/embeddings/`` too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.text_encoding import TextEncoding
from lf_common.errors import ConfigError
from trainer.checkpoint.keys import CHECKPOINT_KEY, TEXT_ENCODER_KEYS
from trainer.interop.embedding_files import Embedding, expand_prompt, read_embedding_file, save_embedding_files
from trainer.lora.adapters import LoraSettings, add_lora
from trainer.modules.latent_diffusion import LatentDiffusion
from trainer.modules.prompt_encoding import encode_prompts_in_step
from trainer.modules.text_encoder_training import freeze_after_penultimate, freeze_unread_layers
from trainer.strategies.optimizer_support import TEXTUAL_INVERSION_SHARDED
from trainer.textual_inversion.data import CAPTIONS
from trainer.textual_inversion.new_tokens import (
    InstalledTokens,
    TextualInversionSettings,
    init_rows,
    install_tokens,
)
from trainer.textual_inversion.prompts import training_prompts

log = logging.getLogger(__name__)
EMBEDDINGS_DIR = "embeddings"
RECORD_KEY = "textual_inversion"  # the checkpoint's record: settings, vector tokens and the rows' state keys


class TextualInversionDiffusion(LatentDiffusion):
    """:class:`LatentDiffusion` with a frozen UNet whose conditioning comes from new tokens' trainable rows.

    Args:
        text_encoder, tokenizer: the base model's (first) text encoder and tokenizer.
        textual_inversion: the tokens, vectors per token, init word, templates
            (:class:`~trainer.textual_inversion.new_tokens.TextualInversionSettings` or a mapping of it).
        text_encoder_2, tokenizer_2: SDXL's second encoder and tokenizer (an SDXL UNet needs them).
        text_encoder_lora: LoRA adapters on the (first) text encoder, trained with the rows and the UNet's adapters
            (pivotal tuning; needs ``lora``). ``text_encoder_2_lora``: the same on SDXL's second encoder.
        *args, **kwargs: as :class:`LatentDiffusion` (``lora``: the UNet's adapters train, pivotal tuning).
    """

    hparams_ignore = (
        *LatentDiffusion.hparams_ignore,
        *("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "textual_inversion"),
        *("text_encoder_lora", "text_encoder_2_lora"),
    )

    def __init__(
        self,
        *args: Any,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        textual_inversion: TextualInversionSettings | Mapping[str, Any],
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_lora: LoraSettings | None = None,
        text_encoder_2_lora: LoraSettings | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train_text_encoder"):
            raise ConfigError(
                "model.train_text_encoder=true trains whole text encoders; textual inversion trains new tokens' rows "
                "beside frozen ones: leave it false (experiment=pivotal_lora trains a UNet LoRA with the rows)"
            )
        super().__init__(*args, **kwargs)
        if self.sdxl != (text_encoder_2 is not None and tokenizer_2 is not None):
            raise ConfigError(
                "an SDXL UNet conditions on two text encoders and only it does: give model.text_encoder_2 and "
                "model.tokenizer_2 with an SDXL base (experiment=textual_inversion_sdxl), none otherwise"
            )
        self.settings = TextualInversionSettings.of(textual_inversion)
        self.hparams[RECORD_KEY] = self.settings.to_dict()
        if self.lora is None:  # with LoRA (pivotal tuning) the adapters train and the base UNet is already frozen
            self.unet.requires_grad_(False)
        encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        self.tokenizers = [t for t in (tokenizer, tokenizer_2) if t is not None]
        initial = initial_vectors(self.settings, self.tokenizers, encoders)
        self.installed: list[InstalledTokens] = [
            install_tokens(tok, enc, self.settings.tokens, init)
            for tok, enc, init in zip(self.tokenizers, encoders, initial, strict=True)
        ]
        self.encoder_loras = check_encoder_adapters(self.lora, text_encoder_lora, text_encoder_2_lora, len(encoders))
        for number, (encoder, lora) in enumerate(zip(encoders, self.encoder_loras, strict=True)):
            if lora is not None:  # after the tokens: add_lora freezes the encoder, rows included; they train again
                add_lora(encoder, lora, KEYS[number])
                self.installed[number].embedding.rows.requires_grad_(True)
        if self.sdxl and self.encoder_loras[0] is not None:  # SDXL reads its penultimate state: the last layer idles
            freeze_after_penultimate(text_encoder)
        # not "text_encoder.": see the module docstring; train mode as the UNet (CLIP's dropouts are 0: no change)
        self.text_encoders = torch.nn.ModuleList(encoders).train()
        self.text_encoding: TextEncoding | None = None  # the latent shards' (long prompts, clip_skip), in setup
        self._warned = False

    def setup(self, stage: str) -> None:
        """Refuse sharded strategies (as the config check does for lf-train), take the latent shards' text
        encoding (long prompts, ``clip_skip``), then as the base class."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
            raise ConfigError(TEXTUAL_INVERSION_SHARDED.format(strategy=type(strategy).__name__))
        manifest = getattr(self.trainer.datamodule, "manifest", None)
        if manifest is not None:  # prompts are encoded as precompute encoded the captions
            self.text_encoding = TextEncoding.recorded(manifest.text_encoder.extra)
        if self.text_encoding is not None and not self.sdxl and self.encoder_loras[0] is not None:
            freeze_unread_layers(self.text_encoders[0], self.text_encoding.clip_skip)  # before the optimizer and DDP
        super().setup(stage)

    def prompts(self, captions: list[str], generator: torch.Generator | None = None) -> list[str]:
        """The step's prompts (templates filled, or the captions), multi-vector tokens expanded."""
        prompts = training_prompts(captions, self.settings.templates, self.settings.tokens, generator)
        if not self._warned and not any(token in p for p in prompts for token in self.settings.tokens):
            self._warned = True  # once: the rows get no gradient from such a batch
            log.warning(
                "textual inversion: no prompt of this batch holds a token of %s (e.g. %r); set "
                "model.textual_inversion.templates, or caption the images with the token",
                list(self.settings.tokens),
                prompts[0] if prompts else "",
            )
        return [expand_prompt(p, self.tokenizers[0]) for p in prompts]

    def conditioning(self, captions: list[str], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``text`` ``(B, T, D)`` (SDXL: and ``pooled`` ``(B, P)``) of the step's prompts (gradients reach the rows)."""
        prompts = self.prompts(captions, generator)
        return encode_prompts_in_step(self.tokenizers, list(self.text_encoders), prompts, self.text_encoding)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return super().training_step({**batch, **self.conditioning(batch[CAPTIONS])}, batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(batch_idx)  # fixed templates: runs compare
        return super().validation_step({**batch, **self.conditioning(batch[CAPTIONS], generator)}, batch_idx)

    def trained_text_encoders(self) -> list[torch.nn.Module]:
        """The encoders whose trainable weights (the new rows only) form the ``embeddings`` parameter group."""
        return list(self.text_encoders)

    @property
    def rows_frozen(self) -> bool:
        """Whether the rows' training is over (``train_fraction`` of ``trainer.max_steps`` done)."""
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        return max_steps is not None and self.global_step >= int(self.settings.train_fraction * max_steps)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drop the rows' gradients once they are frozen (torch's optimizers skip a parameter without one, weight
        decay included, so they stay exactly), and log the gradient norms."""
        if self.settings.train_fraction < 1.0 and self.rows_frozen:
            for installed in self.installed:
                installed.embedding.rows.grad = None
        if self.lora is not None:
            super().on_before_optimizer_step(optimizer)  # the adapters' norm
            return
        if self._is_logging_step():
            norms = [i.embedding.rows.grad.float().norm() for i in self.installed if i.embedding.rows.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.stack(norms).norm())

    def learned(self) -> list[Embedding]:
        """Each token's learned vectors, one tensor per text encoder."""
        per_encoder = [installed.vectors() for installed in self.installed]
        return [Embedding(token, [vectors[token] for vectors in per_encoder]) for token in self.settings.tokens]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the tokens and where their rows are in the state dict, for the export."""
        super().on_save_checkpoint(checkpoint)
        names = {id(p): n for n, p in self.named_parameters()}
        record = checkpoint[CHECKPOINT_KEY]
        record[RECORD_KEY] = {
            "settings": self.settings.to_dict(),
            "vector_tokens": self.installed[0].tokens,
            "row_keys": [names[id(installed.embedding.rows)] for installed in self.installed],
        }
        modules = {id(m): n for n, m in self.named_modules()}
        parts = ("text_encoder", "text_encoder_2")
        for part, encoder, lora in zip(parts, self.text_encoders, self.encoder_loras, strict=False):  # SD: one
            if lora is not None:  # export rebuilds the adapters and loads their weights from where they are held
                record[f"{part}_lora"] = lora.to_dict()
                record.setdefault(TEXT_ENCODER_KEYS, {})[part] = f"{modules[id(encoder)]}."

    def on_train_end(self) -> None:
        """Write the embeddings to ``<default_root_dir>/embeddings/`` (rank 0)."""
        if not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.default_root_dir) / EMBEDDINGS_DIR
        for embedding in self.learned():
            files = save_embedding_files(folder, embedding, {"global_step": str(self.trainer.global_step)})
            log.info("textual inversion: %s written to %s", embedding.token, ", ".join(map(str, files)))


KEYS = ("model.text_encoder_lora", "model.text_encoder_2_lora")


def check_encoder_adapters(
    unet_lora: LoraSettings | None,
    text_encoder_lora: LoraSettings | None,
    text_encoder_2_lora: LoraSettings | None,
    encoders: int,
) -> list[LoraSettings | None]:
    """The adapters of each text encoder (``encoders`` of them), after checking they fit pivotal tuning.

    Raises:
        ConfigError: encoder adapters without the UNet's, ``text_encoder_2_lora`` without SDXL's second encoder,
            or adapters of different kinds (one exported file holds them all).
    """
    loras = [text_encoder_lora, text_encoder_2_lora]
    if any(loras) and unet_lora is None:
        raise ConfigError(
            "model.text_encoder_lora trains with the UNet's adapters (pivotal tuning): set model.lora too, e.g. "
            "experiment=pivotal_lora_text_encoder"
        )
    if text_encoder_2_lora is not None and encoders < 2:
        raise ConfigError("model.text_encoder_2_lora is for SDXL's second text encoder; this model has one: drop it")
    named = zip(("model.lora", *KEYS), [unet_lora, *loras], strict=True)
    kinds = {f"{key}.kind={lora.kind}" for key, lora in named if lora is not None}
    if len({kind.split("=")[1] for kind in kinds}) > 1:
        raise ConfigError(f"{', '.join(sorted(kinds))}: the exported file holds one kind of adapter; set one kind")
    return loras[:encoders]


def initial_vectors(
    settings: TextualInversionSettings, tokenizers: list[CLIPTokenizer], encoders: list[torch.nn.Module]
) -> list[dict[str, torch.Tensor]]:
    """Per encoder, each token's initial rows ``(N, D)``: from ``embeddings_from`` for the token it holds, else from
    the init word.

    Raises:
        ConfigError: the file's token is not among the tokens, or its vectors do not fit the encoders.
    """
    loaded = read_embedding_file(settings.embeddings_from) if settings.embeddings_from else None
    if loaded is not None and loaded.token not in settings.tokens:
        raise ConfigError(
            f"model.textual_inversion.embeddings_from={settings.embeddings_from}: its token {loaded.token!r} is not "
            f"among model.textual_inversion.tokens={list(settings.tokens)}; add it there"
        )
    if loaded is not None and len(loaded.vectors) != len(encoders):
        raise ConfigError(
            f"model.textual_inversion.embeddings_from={settings.embeddings_from}: vectors for {len(loaded.vectors)} "
            f"text encoder(s), the model has {len(encoders)}; use an embedding of this model's kind"
        )
    out = []
    for number, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders, strict=True)):
        rows = {}
        for token in settings.tokens:
            if loaded is not None and token == loaded.token:
                rows[token] = loaded.vectors[number]
                width = encoder.get_input_embeddings().weight.shape[1]
                if rows[token].shape[1] != width:
                    raise ConfigError(
                        f"model.textual_inversion.embeddings_from={settings.embeddings_from}: vectors of width "
                        f"{rows[token].shape[1]}, the text encoder's are {width}: an embedding of another base model"
                    )
            else:
                rows[token] = init_rows(tokenizer, encoder, settings.init_word, settings.num_vectors)
        out.append(rows)
    return out
