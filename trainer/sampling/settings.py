"""What one sampling call is asked for, shared by every image of it (:class:`SampleSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.sampling.schedulers import check_scheduler


@dataclass
class SampleSettings:
    """Settings shared by every image of one call.

    ``negative_prompt`` ``None``: none given. ``original_size`` ``(h, w)`` and ``crop_top_left``
    ``(top, left)``: SDXL's micro-conditioning (default: the output size, or with an init image that
    image's size, and (0, 0)); SDXL only. ``prompt_2`` and ``negative_prompt_2``: what SDXL's second
    text encoder reads (``None``: the same text as the first, as diffusers' ``prompt_2``); SDXL only.
    """

    negative_prompt: str | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str = "ddim"
    use_karras_sigmas: bool = False
    height: int | None = None
    width: int | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    prompt_2: str | None = None
    negative_prompt_2: str | None = None

    def __post_init__(self) -> None:
        check_scheduler(self.scheduler, self.use_karras_sigmas)

    @property
    def micro_conditioning(self) -> bool:
        """Whether SDXL's size/crop inputs differ from their defaults."""
        return self.original_size is not None or tuple(self.crop_top_left) != (0, 0)

    @property
    def second_prompts(self) -> bool:
        """Whether a text of its own is given to SDXL's second text encoder."""
        return self.prompt_2 is not None or self.negative_prompt_2 is not None
