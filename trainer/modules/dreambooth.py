"""DreamBooth with prior preservation (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image
Diffusion Models for Subject-Driven Generation", eq. 2): the denoising loss on the subject's photos
plus ``prior_loss_weight`` times the loss on images the base model made for the class prompt, so
the class keeps its variety while the rare identifier learns the subject.

Optionally the CLIP text encoder trains too, fully or through LoRA adapters (``text_encoder_lora``);
for SDXL both encoders train (``text_encoder_2``, OpenCLIP bigG with its pooled projection, and
``text_encoder_2_lora``). Their embeddings cannot then come from the latent shards: the module
encodes the instance and class prompts in the step (SDXL's penultimate states and pooled embedding
as :func:`~trainer.modules.prompt_encoding.encode_prompts_in_step` makes them, shared with textual inversion), while
the latents and SDXL's size/crop ``time_ids`` still come from the shards. UNet and text encoder are one module
with one optimizer (a parameter group each, with its own learning rate), so DDP and DeepSpeed ZeRO
see a single model; per-part learning rates come from the optimizer config (``optim.text_encoder_lr``, ...).
The encoders' training machinery (adapters, SDXL's checks, the checkpoint's adapter records) is the one every
run shares (:mod:`trainer.modules.text_encoder_training`, held by :class:`LatentDiffusion`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.text_encoding import TextEncoding
from lf_common.errors import ConfigError
from trainer.lora.adapters import LoraSettings
from trainer.modules.latent_diffusion import LatentDiffusion
from trainer.modules.prompt_encoding import encode_prompts_in_step
from trainer.modules.text_encoder_training import TextEncoderParts, freeze_unread_layers


class DreamBoothDiffusion(LatentDiffusion):
    """:class:`LatentDiffusion` on ``{"instance": batch, "class": batch}`` batches.

    Args:
        prior_loss_weight: weight of the class (prior-preservation) loss.
        text_encoder: when given, it trains (fully) and the prompts are encoded in the step.
        tokenizer: the text encoder's tokenizer (needed with ``text_encoder``).
        instance_prompt, class_prompt: the captions of the two sets (needed with ``text_encoder``).
        text_encoder_lora: when given (with ``text_encoder``), the text encoder is frozen and only
            LoRA adapters on ``text_encoder_lora.target_modules`` train.
        text_encoder_2, tokenizer_2: SDXL's second encoder and its tokenizer, trained with ``text_encoder``
            (an SDXL UNet needs both encoders to train the text side; neither fits another UNet).
        text_encoder_2_lora: as ``text_encoder_lora``, for ``text_encoder_2``. The UNet's and the encoders'
            adapters are of one kind (LoRA, or LyCORIS LoHa/LoKr): one exported file holds them.
        max_token_length, clip_skip: how the prompts are encoded in the step (long prompts, the layer read;
            :mod:`data_pipelines.latents.text_encoding`, precompute's and the sampler's recipe).
        *args, **kwargs: as :class:`LatentDiffusion`.
    """

    hparams_ignore = (
        *LatentDiffusion.hparams_ignore,
        *("text_encoder", "tokenizer", "text_encoder_lora", "text_encoder_2", "tokenizer_2", "text_encoder_2_lora"),
    )

    def __init__(
        self,
        *args: Any,
        prior_loss_weight: float = 1.0,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        instance_prompt: str | None = None,
        class_prompt: str | None = None,
        text_encoder_lora: LoraSettings | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_2_lora: LoraSettings | None = None,
        max_token_length: int = 75,
        clip_skip: int = 1,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("train_text_encoder"):
            raise ConfigError(
                "model.train_text_encoder=true trains on latent shards' token ids; DreamBooth encodes its prompts: "
                "use experiment=dreambooth_text_encoder (or dreambooth_lora_text_encoder) and leave it false"
            )
        if text_encoder is not None and (tokenizer is None or instance_prompt is None):
            raise ConfigError("training the text encoder needs model.tokenizer and model.instance_prompt")
        if text_encoder_lora is not None and text_encoder is None:
            raise ConfigError("model.text_encoder_lora needs model.text_encoder, the encoder to add adapters to")
        given = text_encoder is not None or text_encoder_2 is not None  # a lone second one is refused in the base
        parts = TextEncoderParts(text_encoder, tokenizer, text_encoder_2, tokenizer_2) if given else None  # type: ignore[arg-type]
        kwargs["text_encoders"] = parts  # the encoders' machinery is the base class's (text_encoder_training)
        # collects our plain arguments as hyperparameters too
        super().__init__(*args, text_encoder_lora=text_encoder_lora, text_encoder_2_lora=text_encoder_2_lora, **kwargs)
        self.prior_loss_weight = prior_loss_weight
        self.prompts = {"instance": instance_prompt, "class": class_prompt}
        self.text_encoding = TextEncoding(max_token_length, clip_skip)
        self.text_encoding.check_sdxl(self.sdxl)
        if not self.sdxl and self.text_encoder is not None:  # the layers after the one clip_skip reads idle
            freeze_unread_layers(self.text_encoder, clip_skip)

    def encode_prompt(self, part: str, batch_size: int) -> dict[str, torch.Tensor]:
        """The trained text encoder(s)' conditioning of ``part``'s prompt: ``text`` ``(batch_size, T, D)``
        (SDXL: both penultimate states, ``D = D1 + D2``, and ``pooled`` ``(batch_size, P)``)."""
        assert self.text_encoder is not None and self.tokenizer is not None
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        tokenizers = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None][: len(encoders)]
        encoded = encode_prompts_in_step(tokenizers, encoders, [self.prompts[part]], self.text_encoding)
        return {key: value.expand(batch_size, *value.shape[1:]) for key, value in encoded.items()}

    def _part_loss(self, batch: dict[str, dict[str, torch.Tensor]], part: str) -> torch.Tensor:
        data = batch[part]
        if self.text_encoder is not None:  # the shards' time_ids (size and crop) stay
            data = {**data, **self.encode_prompt(part, data["latents"].shape[0])}
        return self.compute_loss(data).loss

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        size = batch["instance"]["latents"].shape[0]
        loss = instance_loss = self._part_loss(batch, "instance")
        self.log("train/instance_loss", instance_loss, batch_size=size)
        if "class" in batch:
            prior_loss = self._part_loss(batch, "class")
            loss = instance_loss + self.prior_loss_weight * prior_loss
            self.log("train/prior_loss", prior_loss, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss


def batch_size(batch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Samples in a DreamBooth batch, instance and class (for Lightning's ``ThroughputMonitor``)."""
    return sum(part["latents"].shape[0] for part in batch.values())
