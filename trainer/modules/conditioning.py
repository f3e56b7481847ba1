"""What the UNet is conditioned on in a training step, besides the noisy latents: the text (with caption
dropout), SDXL's added conditioning, an inpainting UNet's extra input channels, and the loss mask's weights.

Pure functions of a latent batch (the keys of :mod:`data_pipelines.loading.datamodules`); the
:class:`~trainer.modules.latent_diffusion.LatentDiffusion` module holds the settings and calls them.
"""

from __future__ import annotations

import torch

from data_pipelines.loading.datamodules import INPAINTING_BATCH_KEYS, LOSS_MASK_BATCH_KEY, SDXL_BATCH_KEYS
from lf_common.errors import ConfigError

NO_UNCOND_TEXT = (
    "model.caption_dropout > 0 needs uncond_text, the empty caption's embedding: give it, or train with a data "
    "module that has it (latent shards hold it), or set model.caption_dropout=0"
)
NO_LOSS_MASKS = (
    "objective.masked_loss=true but the training latent shards hold no loss masks (loss_mask.npy): give images "
    "masks (KEY.mask.png beside each image, or lf-shards masks.from_alpha=true), run lf-shards and lf-precompute "
    "again, or set objective.masked_loss=false"
)


def caption_drop_mask(
    size: int, device: torch.device, caption_dropout: float, rates: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Which of ``size`` samples lose their caption this step ``(B,)`` bool, or ``None`` without dropout.

    Args:
        size: the batch size ``B``.
        device: where the mask is drawn.
        caption_dropout: the model's rate.
        rates: ``(B,)`` each sample's own rate (a dataset's ``caption_dropout`` in ``data=mixed``; NaN:
            ``caption_dropout``).
    """
    if rates is not None:
        rates = torch.nan_to_num(rates.float().to(device), nan=caption_dropout)
        return torch.rand(size, device=device) < rates if bool((rates > 0).any()) else None
    if caption_dropout <= 0:
        return None
    return torch.rand(size, device=device) < caption_dropout


def drop_captions(
    text: torch.Tensor, drop: torch.Tensor | None, caption_dropout: float, uncond_text: torch.Tensor | None
) -> torch.Tensor:
    """Replace each sample's text ``(B, T, D)`` by the empty caption's ``uncond_text`` ``(T, D)`` with probability
    ``caption_dropout`` (or where ``drop`` ``(B,)`` says, so SDXL's pooled embedding drops with it).

    Raises:
        ConfigError: a caption drops and ``uncond_text`` is ``None``.
    """
    if drop is None:
        if caption_dropout <= 0:
            return text
        drop = caption_drop_mask(text.shape[0], text.device, caption_dropout)
    if uncond_text is None:
        raise ConfigError(NO_UNCOND_TEXT)
    return torch.where(drop[:, None, None], uncond_text.to(text.device, text.dtype), text)


def added_conditioning(
    batch: dict[str, torch.Tensor],
    sdxl: bool,
    drop: torch.Tensor | None = None,
    uncond_pooled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` of a batch: ``text_embeds`` ``(B, P)`` (the pooled embedding, replaced
    by ``uncond_pooled`` ``(P,)`` where ``drop`` ``(B,)`` is set, with the caption) and ``time_ids`` ``(B, 6)``
    float32; ``None`` for a UNet without ``text_time`` embedding (``sdxl`` false).

    Raises:
        ConfigError: the UNet and the latent shards disagree on SDXL conditioning, or a caption drops without
            ``uncond_pooled``.
    """
    has_sdxl_data = all(key in batch for key in SDXL_BATCH_KEYS)
    if not sdxl:
        if has_sdxl_data:
            raise ConfigError(
                "the latent shards are SDXL's (pooled text and time_ids) but the UNet is not: train them with "
                "model=sdxl_tiny, model=sdxl or model=pretrained with an SDXL folder"
            )
        return None
    if not has_sdxl_data:
        raise ConfigError(
            "the UNet is SDXL's (addition_embed_type text_time) and needs pooled text and time_ids: precompute "
            "the shards with an SDXL folder (lf-precompute pretrained=<folder with text_encoder_2/>)"
        )
    pooled = batch["pooled"].float()  # (B, P)
    if drop is not None:
        if uncond_pooled is None:
            raise ConfigError(NO_UNCOND_TEXT)
        pooled = torch.where(drop[:, None], uncond_pooled.to(pooled.device, pooled.dtype), pooled)
    return {"text_embeds": pooled, "time_ids": batch["time_ids"].float()}


def inpainting_conditioning(batch: dict[str, torch.Tensor], in_channels: int) -> torch.Tensor | None:
    """An inpainting UNet's extra input ``(B, 1 + C, h, w)`` float32: the mask, then the masked image's latents
    (diffusers' order, concatenated after the noisy latents); ``None`` for a UNet of ``in_channels`` equal to the
    latents' ``C``.

    Raises:
        ConfigError: the UNet wants inpainting conditioning and the batch has none, or the reverse.
    """
    extra = in_channels - batch["latents"].shape[1]
    if extra == 0:
        return None
    has_masks = all(key in batch for key in INPAINTING_BATCH_KEYS)
    if not has_masks or extra != batch["masked_latents"].shape[1] + 1:
        raise ConfigError(
            f"the UNet takes {in_channels} input channels (an inpainting model): its latent "
            "shards need masks and masked-image latents; precompute them with lf-precompute inpainting=true"
        )
    return torch.cat([batch["mask"], batch["masked_latents"]], dim=1).float()  # (B, 1 + C, h, w)


def pixel_weights(batch: dict[str, torch.Tensor], masked_loss: bool, mask_floor: float) -> torch.Tensor | None:
    """The weight of each latent pixel's error ``(B, 1, h, w)``, or ``None`` (all 1).

    With ``masked_loss`` the batch's ``loss_mask`` ``m`` in [0, 1] gives ``mask_floor + (1 - mask_floor) * m``
    (times the batch's ``loss_weights`` when it has them too). The loss is not divided by the mask's mean:
    as in kohya-ss/sd-scripts (``apply_masked_loss``) and SimpleTuner (``conditioning_type: mask``), the
    weighted squared error is averaged over all pixels, so a pixel that counts weighs the same in a mostly
    masked image as in an unmasked one, and a small mask does not blow up its image's gradient.

    Raises:
        ConfigError: ``masked_loss`` and the batch has no ``loss_mask`` (data without loss masks).
    """
    weights = batch.get("loss_weights")
    if not masked_loss:
        return weights
    if LOSS_MASK_BATCH_KEY not in batch:
        raise ConfigError(NO_LOSS_MASKS)
    masked = mask_floor + (1.0 - mask_floor) * batch[LOSS_MASK_BATCH_KEY].float()  # (B, 1, h, w)
    return masked if weights is None else weights.float() * masked
