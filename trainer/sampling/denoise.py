"""The denoising loop with classifier-free guidance (Ho & Salimans 2022, eq. 6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg


@dataclass
class SDXLConditioning:
    """SDXL's added conditioning of a batch (Podell et al. 2023, sections 2.1-2.2).

    Attributes:
        pooled: the prompts' pooled embeddings ``(B, P)``.
        uncond_pooled: the negative prompts' ``(B, P)``.
        time_ids: ``(B, 6)``: original size, crop top-left and target size of each image.
    """

    pooled: torch.Tensor
    uncond_pooled: torch.Tensor
    time_ids: torch.Tensor

    def added_cond_kwargs(self, guided: bool) -> dict[str, torch.Tensor]:
        """The UNet's ``added_cond_kwargs``: unconditional half first under guidance (as ``context``)."""
        if not guided:
            return {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {
            "text_embeds": torch.cat([self.uncond_pooled, self.pooled]),  # (2B, P)
            "time_ids": torch.cat([self.time_ids, self.time_ids]),  # (2B, 6)
        }


@torch.no_grad()
def denoise(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    timesteps: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    guidance_rescale: float = 0.0,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    conditioning: torch.Tensor | None = None,
    sdxl: SDXLConditioning | None = None,
) -> torch.Tensor:
    """Run the reverse process over ``timesteps``.

    Args:
        unet: the noise-prediction network.
        scheduler: a diffusers sampling scheduler with ``set_timesteps`` already called.
        latents: starting latents ``(B, C, h, w)`` (already scaled by ``init_noise_sigma`` or noised).
        cond: prompt embeddings ``(B, T, D)``.
        uncond: negative-prompt embeddings ``(B, T, D)``.
        guidance_scale: ``w`` in ``eps = eps_u + w (eps_c - eps_u)``; 1 disables guidance.
        timesteps: the timesteps to visit, in order.
        generator: randomness for stochastic schedulers (Euler ancestral), one per image or shared.
        guidance_rescale: ``phi`` of Lin et al. 2024 (eq. 15-16): rescale the guided output to the
            conditional output's standard deviation, mixed by ``phi`` (0: off; 0.7 with zero-terminal-SNR models).
        after_step: ``f(i, latents) -> latents`` applied after step ``i`` (inpainting's latent blending).
        conditioning: an inpainting UNet's mask and masked-image latents ``(B, 1 + C, h, w)``,
            concatenated after the (scaled) latents at every step, as diffusers' inpainting pipeline does.
        sdxl: an SDXL UNet's added conditioning (pooled embeddings and time_ids), as
            ``StableDiffusionXLPipeline`` passes it (``added_cond_kwargs``).

    Returns:
        Denoised latents ``(B, C, h, w)``.
    """
    guided = guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond  # (2B or B, T, D)
    added = sdxl.added_cond_kwargs(guided) if sdxl is not None else None
    if conditioning is not None and guided:
        conditioning = torch.cat([conditioning, conditioning])  # (2B, 1 + C, h, w)
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if conditioning is not None:
            model_input = torch.cat([model_input, conditioning.to(model_input)], dim=1)  # (., C + 1 + C, h, w)
        output = unet(model_input, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        if guided:
            output_uncond, output_cond = output.chunk(2)
            output = output_uncond + guidance_scale * (output_cond - output_uncond)
            if guidance_rescale > 0:
                output = rescale_noise_cfg(output, output_cond, guidance_rescale)
        latents = scheduler.step(output, t, latents, generator=generator).prev_sample
        if after_step is not None:
            latents = after_step(i, latents)
    return latents
