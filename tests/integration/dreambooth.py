"""What the DreamBooth tests share: prompts, the command line of a short run, checks of its export."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import compose_config
from trainer.cli.export import run_export
from trainer.sampling.sampler import Sampler, SampleSettings

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks cat", "a photo of a cat"
SETTINGS = SampleSettings(steps=10, guidance_scale=3.0, height=32, width=32)


def dreambooth_overrides(
    experiment: str, base_model: Path, cat_photos: Path, cache: Path, run: Path, steps: int = 3
) -> list[str]:
    """``lf-train experiment=...`` on the cat photos: 32 px, 2 class images, batches of 2, lr 1e-3,
    metrics logged every step, validation images sampled in 2 steps."""
    return [
        f"experiment={experiment}", f"model.pretrained={base_model}", f"data.instance_dir={cat_photos}",
        f"data.instance_prompt={INSTANCE_PROMPT}", f"data.class_prompt={CLASS_PROMPT}", "data.num_class_images=2",
        "data.resolution=32", f"data.cache_dir={cache}", "data.batch_size=2", "data.class_sample_steps=2",
        "optim.lr=1e-3", f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
        "callbacks.validation_images.steps=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"output_dir={run}",
    ]  # fmt: skip


def export_last(run: Path, export: Path) -> Path:
    """``lf-export`` of the run's last checkpoint into ``export``."""
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={export}"]))
    return export


def changed_parts(base_model: Path, export: Path, held_as: dict[str, torch.dtype] | None = None) -> set[str]:
    """Which of ``unet`` and ``text_encoder`` (and SDXL's ``text_encoder_2``) differ between the base model and
    the export folder.

    Args:
        held_as: per part, the dtype training held its weights in (default float32): a part equal to the base
            rounded to it is unchanged (DeepSpeed's bf16 mode holds a LoRA run's frozen base UNet in bf16, and
            its checkpoint stores that).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    changed = set()
    parts = [("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)]
    if (base_model / "text_encoder_2").is_dir():
        parts.append(("text_encoder_2", CLIPTextModelWithProjection))
    for part, cls in parts:
        before = cls.from_pretrained(base_model / part, local_files_only=True).state_dict()
        after = cls.from_pretrained(export / part, local_files_only=True).state_dict()
        dtype = (held_as or {}).get(part, torch.float32)
        if any(not torch.equal(before[k].to(dtype).float(), after[k].float()) for k in before):
            changed.add(part)
    return changed


def sample_latents(sampler: Sampler, prompt: str, seeds: list[int]) -> torch.Tensor:
    """What the UNet makes for ``prompt``, ``(len(seeds), 4, 8, 8)``, before the (random, tiny) VAE decoder."""
    sampler.decode = lambda x: x
    out, _ = sampler.txt2img([prompt] * len(seeds), seeds, SETTINGS)
    return out
