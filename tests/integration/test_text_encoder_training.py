"""``lf-train model.train_text_encoder=true`` on the digits' token-id shards (``lf-precompute keep_token_ids=true``):
the encoder trains with the UNet, the export holds it (full: ``text_encoder/``; LoRA: its keys in diffusers' and
kohya's LoRA files) and diffusers' pipeline encodes a prompt to what our encoder gives; under DDP and DeepSpeed ZeRO-2
(2 processes, bf16, one torchrun launch of ``tests/integration/precision_matrix.py``) a run resumed from step 2 equals
the uninterrupted one bit for bit at step 4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from data_pipelines.latents.text_encoding import chunked_token_ids, encode_token_ids
from tests.conftest import compose_config, precompute_digits, tiny_train_overrides
from tests.integration.checkpoints import assert_resume_is_exact
from tests.integration.precision_matrix import STEPS
from trainer.cli.export import run_export
from trainer.cli.train import run_train
from trainer.interop.lora_formats import KOHYA_LORA_FILE
from trainer.interop.lora_loading import load_lora
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = pytest.mark.slow

PROMPT = "a handwritten digit seven"
TRAIN_TE = ["model.train_text_encoder=true", "optim.text_encoder_lr=1e-3"]
TE_LORA = (
    "model.text_encoder_lora={_target_:trainer.lora.adapters.LoraSettings,rank:2,alpha:2,"
    "target_modules:[q_proj,k_proj,v_proj,out_proj]}"
)


@pytest.fixture(scope="module")
def id_shards(raw_shards: Path, pretrained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 96 digits' latent shards with token ids, from the shared tiny encoders (8 tokens)."""
    out = tmp_path_factory.mktemp("id_shards") / "latents"
    precompute_digits(raw_shards, pretrained_dir, out, "keep_token_ids=true")
    return out


def _export(run: Path, out: Path) -> Path:
    run_export(compose_config("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out_dir={out}"]))
    return out


def _same(folder_a: Path, folder_b: Path) -> bool:
    a, b = (CLIPTextModel.from_pretrained(f).state_dict() for f in (folder_a, folder_b))
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sdxl_id_shards(raw_shards: Path, sdxl_pretrained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits' SDXL latent shards with both tokenizers' ids."""
    out = tmp_path_factory.mktemp("sdxl_id_shards") / "latents"
    precompute_digits(raw_shards, sdxl_pretrained_dir, out, "keep_token_ids=true")
    return out


def test_sdxl_encoder_adapters_train_export_in_both_layouts_and_sample(sdxl_id_shards, sdxl_pretrained_dir, tmp_path):
    """SDXL: adapters on both encoders (and the UNet's, experiment=lora), the bases unchanged in the export, the
    adapters in diffusers' file (``text_encoder.*``, ``text_encoder_2.*``) and kohya's (``lora_te1_``, ``lora_te2_``),
    and lf-sample loads them."""
    run = tmp_path / "run"
    overrides = [*tiny_train_overrides(sdxl_id_shards, run, steps=2), "model=sdxl_tiny", "experiment=lora"]
    run_train(compose_config("train", [*overrides, *TRAIN_TE, TE_LORA]))
    export = _export(run, tmp_path / "export")
    assert _same(export / "text_encoder", sdxl_pretrained_dir / "text_encoder")  # the base; the adapters apart
    diffusers_keys = load_file(export / "lora" / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in diffusers_keys} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = {key.split("_")[1] for key in load_file(export / "lora" / KOHYA_LORA_FILE)}
    assert kohya == {"unet", "te1", "te2"}
    sampler = Sampler.from_export(export, device="cpu")
    file = export / "lora" / "pytorch_lora_weights.safetensors"
    parts = load_lora(sampler.unet, sampler.text_encoder, file, text_encoder_2=sampler.text_encoder_2)
    assert sorted(parts) == ["text_encoder", "text_encoder_2", "unet"]
    images, _ = sampler.txt2img([PROMPT], [0], SampleSettings(steps=2, height=32, width=32))
    assert images[0].size == (32, 32)


ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["ddp", "deepspeed_stage_2"]
PRECISION = "bf16-mixed"


def assert_exported_encoder_trained_and_diffusers_encodes_as_we_do(export: Path, base: Path) -> None:
    """The export's ``text_encoder/`` is not the base's, and diffusers' pipeline encodes a prompt with it to exactly
    what our recipe gives from the prompt's ids."""
    assert not _same(export / "text_encoder", base / "text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        ids = chunked_token_ids(CLIPTokenizer.from_pretrained(export / "tokenizer"), [PROMPT])
        ours = encode_token_ids(CLIPTextModel.from_pretrained(export / "text_encoder"), ids)
    assert torch.equal(theirs, ours)


@pytest.fixture(scope="module")
def two_process_runs(id_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<runs>/<strategy>/bf16-mixed/{full,resumed}``: 4 steps and the resume from step 2 under DDP and ZeRO-2 on 2
    processes, in one torchrun launch (the imports are paid once); DDP's runs also validate once, at the end."""
    out = tmp_path_factory.mktemp("text_encoder_two_processes")
    validation = [f"data.val_dir={id_shards}", "+trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=8",
                  "+trainer.limit_val_batches=1"]  # fmt: skip
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.integration.precision_matrix",
               f"--latents={id_shards}", f"--out={out}", f"--strategy={','.join(STRATEGIES)}",
               f"--precisions={PRECISION}", *(f"--extra={override}" for override in TRAIN_TE),
               *(f"--strategy-extra=ddp={override}" for override in validation)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.dist
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_is_bit_identical_on_two_processes(two_process_runs, pretrained_dir, tmp_path, strategy):
    """Also, under DDP: the validation loss encodes the validation shards' ids, and the export holds the encoder."""
    full, resumed = (
        two_process_runs / strategy / PRECISION / "full",
        two_process_runs / strategy / PRECISION / "resumed",
    )
    final = f"step-{STEPS:07d}.ckpt"
    assert_resume_is_exact(resumed / "checkpoints" / final, full / "checkpoints" / final)
    if strategy == "ddp":
        (metrics,) = (full / "csv").rglob("metrics.csv")
        assert "val/loss" in metrics.read_text().splitlines()[0]
        export = tmp_path / "export"
        run_export(compose_config("export", [f"ckpt_path={full / 'checkpoints' / final}", f"out_dir={export}"]))
        assert_exported_encoder_trained_and_diffusers_encodes_as_we_do(export, pretrained_dir)
