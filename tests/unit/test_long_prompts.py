"""Long prompts (max_token_length 150) and clip_skip: one recipe in precompute, the in-step encoding
(DreamBooth) and lf-sample, and diffusers' pipeline agrees with our sampler on our embeddings."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.latents.encoders import FrozenEncoders, encode_text
from data_pipelines.latents.text_encoding import TextEncoding, chunked_token_ids
from lf_common.errors import ConfigError
from tests.conftest import save_tiny_vae
from trainer.checkpoint.export import EXPORT_INFO_NAME
from trainer.sampling.sampler import Sampler, SampleSettings
from trainer.sampling.schedulers import make_scheduler
from trainer.tiny_models.tiny_pipeline import make_tiny_export
from trainer.tiny_models.tiny_text_encoder import save_tiny_text_encoder

LONG_PROMPT = ", ".join(f"a {c} digit" for c in ["red", "blue", "green"] * 14)  # ~130 tokens: two chunks
LONG = TextEncoding(max_token_length=150, clip_skip=2)
SEEDS = [3]


@pytest.fixture(scope="module")
def long_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 77-token tiny CLIP and the tiny VAE (the shared fixture's CLIP has 8 tokens)."""
    out = tmp_path_factory.mktemp("long_pretrained")
    save_tiny_text_encoder(out, max_length=77)
    save_tiny_vae(out)
    return out


@pytest.fixture(scope="module")
def frozen(long_pretrained: Path) -> FrozenEncoders:
    root = long_pretrained
    return FrozenEncoders.from_pretrained(
        f"{root}/vae", f"{root}/text_encoder", f"{root}/tokenizer", device="cpu", text_encoding=LONG
    )


@pytest.fixture(scope="module")
def export_dir(long_pretrained: Path, frozen: FrozenEncoders, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny export whose latentforge.json records the latent manifest's text encoder, as lf-export writes it."""
    out = make_tiny_export(long_pretrained, tmp_path_factory.mktemp("long_export") / "export")
    info = {"latent_manifest": {"text_encoder": {"extra": frozen.text_encoder_info.extra}}}
    (out / EXPORT_INFO_NAME).write_text(json.dumps(info), encoding="utf-8")
    return out


def test_chunks_follow_kohya_and_a_short_prompt_keeps_its_first_context(frozen: FrozenEncoders):
    tokenizer, encoder = frozen.tokenizer, frozen.text_encoder
    ids = chunked_token_ids(tokenizer, [LONG_PROMPT], chunks=2)  # (1, 2, 77)
    assert ids.shape == (1, 2, 77) and (ids[:, :, 0] == tokenizer.bos_token_id).all()
    assert len(tokenizer(LONG_PROMPT).input_ids) > 77  # the prompt needs the second chunk
    assert ids[0, 1, 1] != tokenizer.eos_token_id  # ... and the second chunk holds its tail
    plain = TextEncoding(150)
    long_states = encode_text(tokenizer, encoder, [LONG_PROMPT], plain)
    assert long_states.shape == (1, 152, 32)  # BOS + 2 x 75 + EOS, as kohya's
    short = encode_text(tokenizer, encoder, ["a red digit"], plain)
    one_context = encode_text(tokenizer, encoder, ["a red digit"])  # (1, 77, D): today's encoding
    torch.testing.assert_close(short[:, :76], one_context[:, :76], rtol=0, atol=1e-6)
    truncated = encode_text(tokenizer, encoder, [LONG_PROMPT])  # (1, 77, D): cut after 75 tokens
    torch.testing.assert_close(long_states[:, :76], truncated[:, :76], rtol=0, atol=1e-6)  # chunk 1: BOS + 75
    assert not torch.allclose(long_states[:, 76:], truncated[:, 76:77].expand(-1, 76, -1), atol=1e-3)


def test_a_150_token_prompt_embeds_the_same_in_precompute_in_step_and_lf_sample(
    frozen: FrozenEncoders, export_dir: Path, long_pretrained: Path
):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    from trainer.modules.dreambooth import DreamBoothDiffusion

    precomputed = frozen.encode_captions([LONG_PROMPT])  # (1, 152, D), as lf-precompute stores it
    assert precomputed.shape == (1, 152, 32)
    assert {"max_token_length": 150, "clip_skip": 2}.items() <= frozen.text_encoder_info.extra.items()
    assert "max_token_length=150" in frozen.text_output and "clip_skip=2" in frozen.text_output  # the cache key
    sampler = Sampler.from_export(export_dir, device="cpu")
    assert sampler.text_encoding == LONG  # read from the export's record
    sampled = sampler.encode_prompts([LONG_PROMPT])
    module = DreamBoothDiffusion(
        sampler.unet,
        DDPMScheduler(),
        partial(torch.optim.AdamW, lr=1e-4),
        text_encoder=CLIPTextModel.from_pretrained(long_pretrained / "text_encoder", local_files_only=True),
        tokenizer=frozen.tokenizer,
        instance_prompt=LONG_PROMPT,
        max_token_length=150,
        clip_skip=2,
    )
    in_step = module.encode_prompt("instance", 2)["text"]  # (2, 152, D), with gradients
    assert in_step.requires_grad and in_step.shape == (2, 152, 32)
    torch.testing.assert_close(sampled, precomputed, rtol=0, atol=1e-6)
    torch.testing.assert_close(in_step[:1].detach(), precomputed, rtol=0, atol=1e-6)


def test_diffusers_pipeline_on_our_embeddings_samples_our_image(export_dir: Path):
    from diffusers import StableDiffusionPipeline

    sampler = Sampler.from_export(export_dir, device="cpu")
    settings = SampleSettings(steps=3, guidance_scale=3.0, scheduler="ddim")
    ours, _ = sampler.txt2img([LONG_PROMPT], SEEDS, settings)
    cond = sampler.prompt_encoder.encode([LONG_PROMPT])[0]  # (1, 152, D)
    uncond = sampler.prompt_encoder.negative(None, 1)[0]
    pipe = StableDiffusionPipeline.from_pretrained(export_dir, local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config, False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
    ).images
    difference = np.abs(np.asarray(ours[0], dtype=np.int16) - np.asarray(theirs[0], dtype=np.int16)).max()
    assert difference <= 2  # float rounding in the two decoders' uint8 conversions (test_sampler_parity)


def test_clip_skip_2_is_diffusers_encode_prompt_clip_skip_1_and_sdxl_refuses_it(export_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(export_dir, local_files_only=True, safety_checker=None)
    if not hasattr(pipe.text_encoder, "text_model"):  # diffusers reads transformers 4's layout; 5 has no text_model
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)  # not a submodule: no cycle
    prompt = "a handwritten digit seven"
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=1)  # diffusers counts layers skipped
    ours = encode_text(pipe.tokenizer, pipe.text_encoder, [prompt], TextEncoding(clip_skip=2))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    last = encode_text(pipe.tokenizer, pipe.text_encoder, [prompt], TextEncoding(clip_skip=1))
    assert not torch.allclose(ours, last)
    torch.testing.assert_close(last, pipe.encode_prompt(prompt, "cpu", 1, False)[0], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="SDXL already reads"):
        TextEncoding(clip_skip=2).check_sdxl(True)
    with pytest.raises(ConfigError, match="max_token_length=100"):
        TextEncoding(max_token_length=100)


def test_sdxl_long_prompts_keep_the_first_chunks_pooled_embedding_and_caption_variants_store_theirs(
    sdxl_pretrained_dir: Path,
):
    from data_pipelines.latents.pending_samples import PendingSample as _Pending
    from data_pipelines.latents.shard_encoder import LatentShardEncoder
    from data_pipelines.transforms.captions import CaptionSettings
    from data_pipelines.transforms.images import ResizeCrop

    root = sdxl_pretrained_dir
    second = {"text_encoder_2_path": f"{root}/text_encoder_2", "tokenizer_2_path": f"{root}/tokenizer_2"}
    paths = (f"{root}/vae", f"{root}/text_encoder", f"{root}/tokenizer")
    with pytest.raises(ConfigError, match="SDXL already reads"):
        FrozenEncoders.from_pretrained(*paths, device="cpu", text_encoding=TextEncoding(clip_skip=2), **second)
    short = FrozenEncoders.from_pretrained(*paths, device="cpu", **second)
    long = FrozenEncoders.from_pretrained(*paths, device="cpu", text_encoding=TextEncoding(150), **second)
    chunk = short.tokenizer.model_max_length - 2  # the tiny tokenizers hold 8 tokens: chunks of 6
    text, pooled = long.encode_text_and_pooled([LONG_PROMPT])
    first_text, first_pooled = short.encode_text_and_pooled([LONG_PROMPT])  # cut after one chunk
    assert text.shape[1] == 2 * chunk + 2 and long.text_output == "penultimate+pooled;max_token_length=150"
    torch.testing.assert_close(pooled, first_pooled, rtol=0, atol=1e-6)  # the first chunk's, as kohya's
    torch.testing.assert_close(text[:, : chunk + 1], first_text[:, : chunk + 1], rtol=0, atol=1e-6)

    encoder = LatentShardEncoder(short, ResizeCrop(32), captions=CaptionSettings(variants=3, shuffle_tags=True))
    pixels = torch.zeros(3, 32, 32)
    variants = ["cat, dog, sun", "dog, sun, cat", "sun, cat"]
    batch = [_Pending(f"k{i}", pixels, "cat, dog, sun", {}, caption_variants=variants) for i in range(2)]
    (sample, _) = encoder.encode_batch(batch)
    assert sample.text_variants.shape == (3, *sample.text.shape) and sample.pooled_variants.shape == (3, 32)
    np.testing.assert_array_equal(sample.pooled_variants[0], sample.pooled)
    assert not np.allclose(sample.pooled_variants[1], sample.pooled_variants[2])


def test_the_png_parameters_carry_clip_skip_as_automatic1111_writes_it():
    from trainer.sampling.png_info import GenerationParameters, parse_parameters

    made = GenerationParameters("a cat", None, 20, "DDIM", 7.0, 1, 32, 32, clip_skip=2)
    assert "Clip skip: 2" in made.to_text() and parse_parameters(made.to_text()).clip_skip == 2
    assert "Clip skip" not in GenerationParameters("a cat", None, 20, "DDIM", 7.0, 1, 32, 32).to_text()
