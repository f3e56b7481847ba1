"""SDXL fine-tuning recipes on CPU with a tiny SDXL-shaped base (fixtures: tests/integration/conftest.py):
DreamBooth with prior preservation training the UNet and both text encoders
(``experiment=dreambooth_sdxl_text_encoder``), and LoRA on the UNet and both encoders
(``experiment=dreambooth_lora_sdxl``). Each run trains, exports, and the sampler runs from the export;
the LoRA files (diffusers' and kohya's ``lora_te1_``/``lora_te2_``) load back onto all three parts.
Recipes that cannot work are refused when the module is built. Marked ``dist``: both recipes on 2 CPU
processes (gloo), the full one under DDP and DeepSpeed ZeRO-2 bf16, the LoRA one under ZeRO-2 bf16 (33-36 s
each here; the whole file 154 s)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import webdataset as wds
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors.torch import load_file

from data_pipelines.latents.format import LatentManifest, decode_latent_sample, micro_conditioning
from lf_common.errors import DataError
from tests.conftest import compose_config
from tests.integration.checkpoints import assert_resume_is_exact, assert_same_nested, consumed_batches
from tests.integration.dreambooth import INSTANCE_PROMPT, changed_parts, dreambooth_overrides, export_last
from trainer.checkpoint.export import build_export
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.hydra_app import optimizer_factories
from trainer.cli.train import run_train
from trainer.interop.lora_formats import sdxl_lora_names
from trainer.interop.lora_loading import load_lora
from trainer.sampling.sampler import Sampler, SampleSettings

pytestmark = pytest.mark.slow

ALL_PARTS = ["unet", "text_encoder", "text_encoder_2"]


def logged_losses(run: Path) -> dict[str, list[float]]:
    """The run's logged ``train/instance_loss`` and ``train/prior_loss`` values (CSV logger)."""
    losses: dict[str, list[float]] = {"train/instance_loss": [], "train/prior_loss": []}
    for metrics in run.rglob("metrics.csv"):
        with metrics.open() as file:
            for row in csv.DictReader(file):
                for key, values in losses.items():
                    if row.get(key):
                        values.append(float(row[key]))
    return losses


def assert_trained_with_prior(run: Path, cache: Path) -> None:
    """Finite instance and prior losses were logged; both sets' shards are SDXL's, with each photo's size."""
    losses = logged_losses(run)
    assert losses["train/instance_loss"] and losses["train/prior_loss"], losses
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    for name in ("instance", "class"):
        manifest = LatentManifest.load(cache / name / "latents")
        assert manifest.sdxl and manifest.pooled_shape == [32], name
    manifest = LatentManifest.load(cache / "instance" / "latents")
    url = str(cache / "instance" / "latents" / manifest.shards[0].name)
    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())))
    sample = decode_latent_sample(raw, tuple(manifest.latent_shape), tuple(manifest.text_shape), pooled_shape=(32,))
    assert micro_conditioning(sample.meta).tolist() == [220, 220, 0, 0, 32, 32]  # a 220 px photo, center crop to 32


def build_module(overrides: list[str]) -> object:
    """The training module of ``lf-train overrides`` (built as ``lf-train`` builds it, before any data)."""
    cfg = compose_config("train", overrides)
    return instantiate(cfg.model, **optimizer_factories(cfg))


def encode_prompt(sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's SDXL conditioning of the instance prompt: ``(text (1, T, 64), pooled (1, 32))``."""
    from data_pipelines.latents.sdxl_text import encode_text_sdxl

    encoders = [sampler.text_encoder, sampler.text_encoder_2]
    return encode_text_sdxl([sampler.tokenizer, sampler.tokenizer_2], encoders, [INSTANCE_PROMPT])


def test_dreambooth_sdxl_fine_tunes_the_unet_only(sdxl_base_model, cat_photos, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "c"
    run_train(compose_config("train", dreambooth_overrides("dreambooth_sdxl", sdxl_base_model, cat_photos, cache, run)))
    assert_trained_with_prior(run, cache)
    assert changed_parts(sdxl_base_model, export_last(run, tmp_path / "export")) == {"unet"}
    Sampler.from_checkpoint(run / "checkpoints" / "last.ckpt", device="cpu").txt2img(
        [INSTANCE_PROMPT], [0], SampleSettings(steps=2)
    )


def test_dreambooth_sdxl_trains_unet_and_both_text_encoders_and_resumes_exactly(sdxl_base_model, cat_photos, tmp_path):
    """``dreambooth_sdxl_text_encoder`` trains the UNet and both encoders with prior preservation, and a run
    stopped at step 2 and resumed to step 4 equals an uninterrupted 4-step run bit for bit: the three parts'
    weights and optimizer state, schedule, RNG states and both streams' positions (as the SD 1.x test in
    ``test_dreambooth.py``)."""
    cache = tmp_path / "c"  # the first run generates and encodes; the others reuse

    def train(run: str, steps: int, *extra: str) -> Path:
        overrides = dreambooth_overrides(
            "dreambooth_sdxl_text_encoder", sdxl_base_model, cat_photos, cache, tmp_path / run, steps=steps
        )
        run_train(compose_config("train", [*overrides, "optim.text_encoder_lr=1e-3", *extra]))
        return tmp_path / run / "checkpoints" / "last.ckpt"

    whole = train("whole", 4)
    assert_trained_with_prior(tmp_path / "whole", cache)
    export = export_last(tmp_path / "whole", tmp_path / "export")
    assert changed_parts(sdxl_base_model, export) == set(ALL_PARTS)
    before, after = (load_file(folder / "text_encoder" / "model.safetensors") for folder in (sdxl_base_model, export))
    idle = [key for key in before if ".layers.1." in key or "final_layer_norm" in key]  # after the penultimate state
    assert idle and all(torch.equal(before[key], after[key]) for key in idle), "SDXL never reads these"
    Sampler.from_export(export, device="cpu").txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2))

    assert load_checkpoint(train("stopped", 2))["DreamBoothDataModule"]["instance"]["batches"] == 2
    resumed = train("stopped", 4, "ckpt_path=last")
    assert_resume_is_exact(resumed, whole, data_module="DreamBoothDataModule")
    a, b = load_checkpoint(resumed), load_checkpoint(whole)
    assert {key.split(".")[0] for key in a["state_dict"]} >= set(ALL_PARTS), "all three parts are compared"
    assert consumed_batches(a["DreamBoothDataModule"]) == {"instance": 4, "class": 4}
    assert_same_nested(a["callbacks"]["RNGState"], b["callbacks"]["RNGState"], "RNG states")


def test_lora_sdxl_trains_adapters_on_unet_and_both_encoders_and_loads_back(sdxl_base_model, cat_photos, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "c"
    overrides = dreambooth_overrides("dreambooth_lora_sdxl", sdxl_base_model, cat_photos, cache, run)
    run_train(compose_config("train", [*overrides, "optim.lr=2e-2"]))
    assert_trained_with_prior(run, cache)
    export = export_last(run, tmp_path / "export")
    assert changed_parts(sdxl_base_model, export) == set(), "the export's base pipeline is the untouched base"

    diffusers_keys = {key.split(".")[0] for key in load_file(export / "lora" / "pytorch_lora_weights.safetensors")}
    assert diffusers_keys == set(ALL_PARTS)
    kohya_prefixes = {
        key.split("_")[0] + "_" + key.split("_")[1] for key in load_file(export / "lora" / "lora_kohya.safetensors")
    }
    assert kohya_prefixes == {"lora_unet", "lora_te1", "lora_te2"}

    merged, _, _ = build_export(run / "checkpoints" / "last.ckpt")  # the trained adapters merged into the parts
    with torch.no_grad():
        trained = encode_prompt(Sampler(merged.unet, merged.vae, merged.text_encoder, merged.tokenizer,
                                        dict(merged.scheduler.config), text_encoder_2=merged.text_encoder_2,
                                        tokenizer_2=merged.tokenizer_2))  # fmt: skip
    for file in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        sampler = Sampler.from_export(export, device="cpu")
        with torch.no_grad():
            base = encode_prompt(sampler)
        parts = load_lora(
            sampler.unet, sampler.text_encoder, export / "lora" / file, text_encoder_2=sampler.text_encoder_2
        )
        assert sorted(parts) == sorted(ALL_PARTS), file
        with torch.no_grad():
            found = encode_prompt(sampler)
        for ours, expected, before in zip(found, trained, base, strict=True):
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
            assert (before - expected).abs().max() > 1e-5, f"{file}: the trained adapters change nothing"
        sampler.txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2))


def test_loha_sdxl_trains_on_unet_and_both_encoders_and_loads_back(sdxl_base_model, cat_photos, tmp_path):
    """LyCORIS LoHa adapters on SDXL's UNet and both encoders: exported as one LyCORIS file in kohya's SDXL names
    (ldm-named UNet modules, ``lora_te1_``, ``lora_te2_``), which ``lf-sample lora=`` loads back onto all three
    parts to what training made (the adapters merged into the checkpoint's parts)."""
    run, cache = tmp_path / "run", tmp_path / "c"
    overrides = dreambooth_overrides("dreambooth_lora_sdxl", sdxl_base_model, cat_photos, cache, run, steps=2)
    loha = ["+model.lora.kind=loha", "+model.text_encoder_lora.kind=loha"]
    run_train(compose_config("train", [*overrides, "optim.lr=2e-2", *loha]))
    export = export_last(run, tmp_path / "export")
    file = export / "lora" / "lora_lycoris.safetensors"
    modules = {key.split(".")[0] for key in load_file(file)}
    assert {"_".join(m.split("_")[:2]) for m in modules} == {"lora_unet", "lora_te1", "lora_te2"}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for m in modules if m.startswith("lora_unet_")), sorted(modules)  # fmt: skip
    assert all(key.split(".")[1] in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")
               for key in load_file(file)), "LoHa's parameters"  # fmt: skip

    merged, _, _ = build_export(run / "checkpoints" / "last.ckpt")  # the trained adapters merged into the parts
    sampler = Sampler.from_export(export, device="cpu")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        before = encode_prompt(sampler)
        trained = encode_prompt(Sampler(merged.unet, merged.vae, merged.text_encoder, merged.tokenizer,
                                        dict(merged.scheduler.config), text_encoder_2=merged.text_encoder_2,
                                        tokenizer_2=merged.tokenizer_2))  # fmt: skip
        expected_unet = merged.unet(x, t, trained[0], added_cond_kwargs=added).sample
    with pytest.raises(DataError, match="an SDXL UNet's LyCORIS file names its modules as ldm does"):
        load_lora(sampler.unet, sampler.text_encoder, file, text_encoder_2=sampler.text_encoder_2)
    names = sdxl_lora_names(sampler.unet)  # what lf-sample passes
    parts = load_lora(sampler.unet, sampler.text_encoder, file, text_encoder_2=sampler.text_encoder_2, unet_names=names)
    assert sorted(parts) == sorted(ALL_PARTS)
    with torch.no_grad():
        found = encode_prompt(sampler)
        found_unet = sampler.unet(x, t, trained[0], added_cond_kwargs=added).sample
    for ours, expected, base in zip((*found, found_unet), (*trained, expected_unet), (*before, None), strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
        assert base is None or (base - expected).abs().max() > 1e-5, "the trained adapters change nothing"
    sampler.txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2))


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        ("dreambooth_text_encoder", "an SDXL UNet conditions on two text encoders"),
        ("dreambooth_lora_text_encoder", "an SDXL UNet conditions on two text encoders"),
    ],
)
def test_sd1_text_encoder_recipes_on_an_sdxl_base_are_refused(
    sdxl_base_model, cat_photos, tmp_path, experiment, expected
):
    overrides = dreambooth_overrides(experiment, sdxl_base_model, cat_photos, tmp_path / "c", tmp_path / "run")
    with pytest.raises(InstantiationException, match=expected):
        build_module(overrides)


def test_second_encoder_on_an_sd1_base_and_mixed_adapter_kinds_are_refused(
    base_model, sdxl_base_model, cat_photos, tmp_path
):
    second = [f"model.{part}.path={sdxl_base_model}" for part in ("text_encoder_2", "tokenizer_2")]
    overrides = dreambooth_overrides("dreambooth_lora_sdxl", base_model, cat_photos, tmp_path / "c", tmp_path / "run")
    with pytest.raises(InstantiationException, match="the UNet is not SDXL's"):
        build_module([*overrides, *second])
    overrides = dreambooth_overrides(
        "dreambooth_lora_sdxl", sdxl_base_model, cat_photos, tmp_path / "c", tmp_path / "r"
    )
    with pytest.raises(InstantiationException, match="the exported file holds one kind of adapter"):
        build_module([*overrides, "+model.text_encoder_lora.kind=loha"])  # the UNet's are LoRA


@pytest.mark.dist
@pytest.mark.parametrize(
    ("strategy", "precision", "experiment", "lora"),
    [
        ("ddp", "32-true", "dreambooth_sdxl_text_encoder", False),
        ("deepspeed_stage_2", "bf16-mixed", "dreambooth_sdxl_text_encoder", False),  # DeepSpeed's bf16 mode
        ("deepspeed_stage_2", "bf16-mixed", "dreambooth_lora_sdxl", True),
    ],
)
def test_sdxl_recipes_on_two_processes(sdxl_base_model, cat_photos, tmp_path, strategy, precision, experiment, lora):
    """2 CPU processes (gloo) started by Lightning: each rank generates its share of the class images; the
    export samples. DeepSpeed's bf16 mode holds the frozen base in bf16 (the export's base is it, rounded)."""
    from tests.integration.cli import run_cli

    run = tmp_path / "run"
    overrides = dreambooth_overrides(experiment, sdxl_base_model, cat_photos, tmp_path / "c", run)
    distributed = [f"strategy={strategy}", f"trainer.precision={precision}", "trainer.devices=2"]
    result = run_cli("lf-train", *overrides, "data.num_class_images=4", "optim.text_encoder_lr=1e-3", *distributed,
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "c" / "class_images").glob("*.png")) == [
        f"class-{i:05d}.png" for i in range(4)
    ]
    (metrics,) = (run / "csv").rglob("metrics.csv")  # rank 0's logger only
    assert "train/prior_loss" in metrics.read_text().splitlines()[0]
    export = export_last(run, tmp_path / "export")
    sampler = Sampler.from_export(export, device="cpu")
    if not lora:
        assert changed_parts(sdxl_base_model, export) == set(ALL_PARTS)
    else:
        assert changed_parts(sdxl_base_model, export, dict.fromkeys(ALL_PARTS, torch.bfloat16)) == set()
        loaded = load_lora(sampler.unet, sampler.text_encoder, export / "lora" / "lora_kohya.safetensors",
                           text_encoder_2=sampler.text_encoder_2)  # fmt: skip
        assert sorted(loaded) == sorted(ALL_PARTS)
    sampler.txt2img([INSTANCE_PROMPT], [0], SampleSettings(steps=2))
