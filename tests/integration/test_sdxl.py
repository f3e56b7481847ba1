"""Stable Diffusion XL end to end on CPU with the tiny SDXL-shaped models (``model=sdxl_tiny``).

Precompute of the digits with two text encoders (checked against diffusers' own
``StableDiffusionXLPipeline.encode_prompt``), then the precision matrix's checks (finite losses,
weights and a float32 EMA that move, exact resume from step 2 to 4, an export that diffusers loads
and samples from, the included sampler on the checkpoint) for one process in float32 and for two
processes under DDP in bf16-mixed, and under FSDP and DeepSpeed ZeRO-3 in bf16 (one launch for both);
last, our sampler against ``StableDiffusionXLPipeline`` on the export, same seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipelines.latents.format import LatentManifest, decode_latent_sample, load_uncond_pooled, micro_conditioning
from data_pipelines.latents.precompute import StaleLatentsError
from tests.conftest import compose_config
from tests.integration.precision_matrix import STEPS, check_combination, run_matrix
from trainer.cli.export import run_export
from trainer.cli.precompute import run_precompute
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = pytest.mark.slow

SDXL_TINY = "model=sdxl_tiny"
ROOT = Path(__file__).resolve().parents[2]
FLOAT32 = {"weights": "torch.float32", "input": "torch.float32", "autocast": None}
BF16_AUTOCAST = {"weights": "torch.float32", "input": "torch.float32", "autocast": "torch.bfloat16"}


def sdxl_pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_precompute_stores_what_diffusers_sdxl_pipeline_encodes(sdxl_latent_dir, sdxl_pretrained_dir, raw_shards):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    manifest = LatentManifest.load(sdxl_latent_dir)
    assert manifest.sdxl and manifest.text_shape == [8, 64] and manifest.pooled_shape == [32]
    assert manifest.text_encoder_2.class_name == "CLIPTextModelWithProjection"
    assert manifest.shards[0].cache_key["text_output"] == "penultimate+pooled"
    assert not load_uncond_pooled(sdxl_latent_dir, manifest).any(), "SDXL's unconditional pooled embedding is zeros"

    url = str(sdxl_latent_dir / manifest.shards[0].name)
    raw = list(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))[:3]
    samples = [decode_latent_sample(r, (4, 8, 8), (8, 64), pooled_shape=(32,)) for r in raw]
    load = {"local_files_only": True}
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=CLIPTextModel.from_pretrained(sdxl_pretrained_dir / "text_encoder", **load),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(sdxl_pretrained_dir / "text_encoder_2", **load),
        tokenizer=CLIPTokenizer.from_pretrained(sdxl_pretrained_dir / "tokenizer", **load),
        tokenizer_2=CLIPTokenizer.from_pretrained(sdxl_pretrained_dir / "tokenizer_2", **load),
        unet=None,
        scheduler=None,
        add_watermarker=False,
    )
    captions = [s.caption for s in samples]
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.stack([s.text for s in samples]), text.numpy(), atol=2e-2, rtol=1e-3)
    np.testing.assert_allclose(np.stack([s.pooled for s in samples]), pooled.numpy(), atol=2e-2, rtol=1e-3)
    for sample in samples:  # the raw digits are 32x32 images, encoded at 32x32 (uncropped)
        assert micro_conditioning(sample.meta).tolist() == [32, 32, 0, 0, 32, 32]

    # the second encoder is in the cache key: SD 1.x's encoders into the same folder are refused by name
    overrides = [f"shards={raw_shards}", f"out_dir={sdxl_latent_dir}", "resolution=32"]
    parts = [f"{key}_path={sdxl_pretrained_dir / key}" for key in ("vae", "text_encoder", "tokenizer")]
    with pytest.raises(StaleLatentsError, match="the second text encoder, the second tokenizer, the text encoders"):
        run_precompute(compose_config("precompute", [*overrides, "pretrained=unused", *parts]))


@pytest.fixture(scope="module")
def single_run(sdxl_latent_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl_single")
    run_matrix(sdxl_latent_dir, out, "single", ["32-true"], devices=1, extra=(SDXL_TINY,))
    return out / "32-true"


def test_single_process_trains_resumes_exactly_exports_and_samples(single_run, tmp_path):
    check_combination(single_run, FLOAT32, tmp_path)
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index


def test_two_processes_under_ddp_in_bf16_mixed(sdxl_latent_dir, tmp_path_factory, tmp_path):
    out = tmp_path_factory.mktemp("sdxl_ddp")
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.integration.precision_matrix",
               f"--latents={sdxl_latent_dir}", f"--out={out}", "--strategy=ddp",
               "--precisions=bf16-mixed", f"--extra={SDXL_TINY}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    check_combination(out / "bf16-mixed", BF16_AUTOCAST, tmp_path)


BF16_WEIGHTS = {"weights": "torch.bfloat16", "input": "torch.bfloat16", "autocast": None}
SHARDED = ["fsdp", "deepspeed_stage_3"]


@pytest.mark.dist
def test_two_processes_under_fsdp_and_zero3_in_bf16_mixed(sdxl_latent_dir, tmp_path_factory, tmp_path):
    """Each sharded strategy in a launch of its own (as a user runs one; one process running FSDP then ZeRO-3
    aborted at random on a loaded machine): ZeRO-3's bf16 mode and FSDP's mixed precision feed and hold bf16;
    losses finite, weights and EMA move, the sharded checkpoint resumes bit for bit, exports and samples.
    DeepSpeed's CPU backend does not compile its inference-only shared-memory op
    (``trainer/strategies/deepspeed_private.py``)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    for strategy in SHARDED:
        out = tmp_path_factory.mktemp(f"sdxl_{strategy}")
        command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.integration.precision_matrix",
                   f"--latents={sdxl_latent_dir}", f"--out={out}", f"--strategy={strategy}",
                   "--precisions=bf16-mixed", f"--extra={SDXL_TINY}"]  # fmt: skip
        result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "shm_comm" not in result.stdout + result.stderr, "DeepSpeed built its inference-only shared-memory op"
        check_combination(out / "bf16-mixed", BF16_WEIGHTS, tmp_path / strategy)


def test_our_sampler_matches_stable_diffusion_xl_pipeline_on_the_export(single_run, tmp_path):
    checkpoint = single_run / "full" / "checkpoints" / f"step-{STEPS:07d}.ckpt"
    export = tmp_path / "export"
    run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={export}"]))
    prompts, seeds = ["a handwritten digit three", "a handwritten digit eight"], [5, 6]
    ours, _ = Sampler.from_export(export, device="cpu").txt2img(
        prompts, seeds, SampleSettings(steps=3, guidance_scale=3.0, scheduler="euler")
    )
    from trainer.sampling.schedulers import make_scheduler

    pipe = sdxl_pipeline(export)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config, False)
    theirs = pipe(
        prompts,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    a = np.stack([np.asarray(i, dtype=np.int16) for i in ours])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in theirs])
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert int(np.abs(a - b).max()) <= 2


def test_checkpoint_exports_to_one_sdxl_file_that_imports_to_the_same_tensors(single_run, tmp_path):
    """``lf-export format=single_file`` of an SDXL checkpoint (SDXL's original layout), then ``lf-import``
    of the file alone: the same tensors as the diffusers folder export of the same checkpoint."""
    from safetensors.torch import load_file

    from trainer.cli.import_model import run_import
    from trainer.interop.pipeline_weights import load_diffusers_folder

    checkpoint = single_run / "full" / "checkpoints" / f"step-{STEPS:07d}.ckpt"
    folder, file = tmp_path / "export", tmp_path / "sdxl.safetensors"
    run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={folder}"]))
    run_export(compose_config("export", [f"ckpt_path={checkpoint}", "format=single_file", f"out_file={file}",
                                         f"out_dir={tmp_path / 'unused'}"]))  # fmt: skip
    keys = load_file(str(file)).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    imported = Path(
        run_import(compose_config("import", [f"pretrained={file}", f"out_dir={tmp_path / 'imported'}"]))["out_dir"]
    )
    assert json.loads((imported / "latentforge.json").read_text())["model_type"] == "sdxl"
    expected, found = load_diffusers_folder(folder).networks(), load_diffusers_folder(imported).networks()
    assert found.keys() == expected.keys() == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for name, network in expected.items():
        state = found[name].state_dict()
        for key, tensor in network.state_dict().items():
            assert torch.equal(state[key], tensor), f"{name}.{key}"


def test_lora_run_exports_sdxl_kohya_and_diffusers_lora_files(sdxl_latent_dir, tmp_path):
    """``lf-train model=sdxl_tiny experiment=lora`` -> ``lf-export``: ``lora/`` holds kohya's SDXL layout
    (ldm-named UNet modules) and diffusers' file; each applied to the exported base UNet gives the trained one."""
    from safetensors.torch import load_file

    from tests.conftest import tiny_train_overrides
    from trainer.checkpoint.reading import build_unet, load_checkpoint
    from trainer.cli.train import run_train
    from trainer.interop.lora_loading import load_lora

    run, export = tmp_path / "run", tmp_path / "export"
    lora = ["experiment=lora", "optim.lr=2e-2", "model.lora.target_modules=[to_q,to_out.0,proj_in,conv1]"]
    run_train(compose_config("train", [*tiny_train_overrides(sdxl_latent_dir, run, steps=2), SDXL_TINY, *lora]))
    checkpoint = run / "checkpoints" / "last.ckpt"
    run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={export}"]))
    kohya = load_file(export / "lora" / "lora_kohya.safetensors")
    modules = {key.split(".")[0] for key in kohya}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for m in modules), sorted(modules)  # fmt: skip
    assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # down_blocks.0.resnets.0.conv1

    trained, _ = build_unet(load_checkpoint(checkpoint))
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 8, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        expected = trained(x, t, text, added_cond_kwargs=added).sample
    for file in ("lora_kohya.safetensors", "pytorch_lora_weights.safetensors"):
        ours = Sampler.from_export(export, device="cpu")
        loaded = load_lora(ours.unet, ours.text_encoder, export / "lora" / file, text_encoder_2=ours.text_encoder_2)
        assert loaded == ["unet"]
        with torch.no_grad():
            found = ours.unet(x, t, text, added_cond_kwargs=added).sample
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)
        ours.unet.set_adapters(["lora"], weights=[0.0])
        with torch.no_grad():
            base = ours.unet(x, t, text, added_cond_kwargs=added).sample
        assert (base - expected).abs().max() > 1e-4, "the trained adapters change nothing"
