"""DreamBooth with prior preservation (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image
Diffusion Models for Subject-Driven Generation", eq. 2): the denoising loss on the subject's photos
plus ``prior_loss_weight`` times the loss on images the base model made for the class prompt, so
the class keeps its variety while the rare identifier learns the subject.

Optionally the CLIP text encoder trains too, fully or through LoRA adapters (``text_encoder_lora``).
Its embeddings cannot then come from the latent shards:
the module encodes the instance and class prompts in the step. UNet and text encoder are one module
with one optimizer (a parameter group each, with its own learning rate), so DDP and DeepSpeed ZeRO
see a single model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.checkpoint.keys import CHECKPOINT_KEY
from trainer.lora.adapters import LoraSettings, add_lora
from trainer.modules.latent_diffusion import LatentDiffusion


class DreamBoothDiffusion(LatentDiffusion):
    """:class:`LatentDiffusion` on ``{"instance": batch, "class": batch}`` batches.

    Args:
        prior_loss_weight: weight of the class (prior-preservation) loss.
        text_encoder: when given, it trains (fully) and the prompts are encoded in the step.
        tokenizer: the text encoder's tokenizer (needed with ``text_encoder``).
        instance_prompt, class_prompt: the captions of the two sets (needed with ``text_encoder``).
        text_encoder_lr: the text encoder's learning rate (default: the optimizer's).
        text_encoder_lora: when given (with ``text_encoder``), the text encoder is frozen and only
            LoRA adapters on ``text_encoder_lora.target_modules`` train.
        *args, **kwargs: as :class:`LatentDiffusion`.
    """

    hparams_ignore = (*LatentDiffusion.hparams_ignore, "text_encoder", "tokenizer", "text_encoder_lora")

    def __init__(
        self,
        *args: Any,
        prior_loss_weight: float = 1.0,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        instance_prompt: str | None = None,
        class_prompt: str | None = None,
        text_encoder_lr: float | None = None,
        text_encoder_lora: LoraSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # collects our plain arguments as hyperparameters too
        self.hparams["trains_text_encoder"] = text_encoder is not None
        self.prior_loss_weight = prior_loss_weight
        if text_encoder is not None and (tokenizer is None or instance_prompt is None):
            raise ValueError("training the text encoder needs model.tokenizer and model.instance_prompt")
        if text_encoder_lora is not None and text_encoder is None:
            raise ValueError("model.text_encoder_lora needs model.text_encoder, the encoder to add adapters to")
        self.text_encoder_lora = text_encoder_lora
        if text_encoder is not None:
            text_encoder.train().requires_grad_(True)
            if text_encoder_lora is not None:
                add_lora(text_encoder, text_encoder_lora, "model.text_encoder_lora")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.prompts = {"instance": instance_prompt, "class": class_prompt}
        self.text_encoder_lr = text_encoder_lr

    def encode_prompt(self, part: str, batch_size: int) -> torch.Tensor:
        """The trained text encoder's embedding of ``part``'s prompt, ``(batch_size, T, D)``."""
        assert self.text_encoder is not None and self.tokenizer is not None
        ids = self.tokenizer(
            [self.prompts[part]], padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        return self.text_encoder(ids).last_hidden_state.expand(batch_size, -1, -1)

    def _part_loss(self, batch: dict[str, dict[str, torch.Tensor]], part: str) -> torch.Tensor:
        data = batch[part]
        if self.text_encoder is not None:
            data = {**data, "text": self.encode_prompt(part, data["latents"].shape[0])}
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

    def configure_optimizers(self) -> Any:
        if self.text_encoder is None:
            return super().configure_optimizers()
        text_group: dict[str, Any] = {"params": [p for p in self.text_encoder.parameters() if p.requires_grad]}
        if self.text_encoder_lr is not None:
            text_group["lr"] = self.text_encoder_lr
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad]}, text_group]
        optimizer = self.optimizer_factory(params=groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.text_encoder_lora is not None:  # export rebuilds the adapters before loading the weights
            checkpoint[CHECKPOINT_KEY]["text_encoder_lora"] = self.text_encoder_lora.to_dict()


def batch_size(batch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Samples in a DreamBooth batch, instance and class (for Lightning's ``ThroughputMonitor``)."""
    return sum(part["latents"].shape[0] for part in batch.values())
