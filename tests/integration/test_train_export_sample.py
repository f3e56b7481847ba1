"""lf-train -> lf-export -> lf-sample on the tiny precomputed digits (a few steps, CPU)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lf_common.errors import DataError
from tests.conftest import compose_config, tiny_train_overrides
from trainer.checkpoint.keys import EMA_STATE_KEY
from trainer.checkpoint.reading import load_checkpoint
from trainer.cli.export import run_export
from trainer.cli.sample import run_sample
from trainer.cli.train import run_train
from trainer.sampling.png_info import read_parameters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(latent_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    metrics = run_train(compose_config("train", tiny_train_overrides(latent_dir, out, steps=5)))
    return out, metrics


def test_training_writes_resumable_checkpoints_with_ema(trained):
    out, metrics = trained
    assert metrics["global_step"] == 5
    assert np.isfinite(metrics["train/loss"])
    assert np.isnan(metrics["optimized_metric"])  # the default, val/loss, needs data.val_dir
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step-0000002.ckpt", "step-0000004.ckpt", "step-0000005.ckpt"]
    last = load_checkpoint(out / "checkpoints" / "last.ckpt")  # weights_only=True
    assert last["global_step"] == 5
    ema, raw = last["state_dict"], last["current_model_state"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "EMA and raw weights are both stored, and differ"
    assert last["latentforge"]["latent_manifest"]["latent_shape"] == [4, 8, 8]
    assert (out / "csv" / "version_0" / "metrics.csv").is_file()


def test_resume_continues_from_the_checkpoint(trained, latent_dir, tmp_path):
    out, _ = trained
    overrides = tiny_train_overrides(latent_dir, tmp_path, steps=8)
    metrics = run_train(compose_config("train", [*overrides, f"ckpt_path={out / 'checkpoints' / 'step-0000004.ckpt'}"]))
    assert metrics["global_step"] == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.ckpt")) == [
        "step-0000006.ckpt",
        "step-0000008.ckpt",
    ]


def test_validation_loss_on_a_second_latent_folder(latent_dir, tmp_path):
    overrides = tiny_train_overrides(latent_dir, tmp_path, steps=4)
    metrics = run_train(
        compose_config("train", [*overrides, f"data.val_dir={latent_dir}", "trainer.val_check_interval=2"])
    )
    assert np.isfinite(metrics["val/loss"])


def test_export_loads_in_diffusers_and_samples_reproducibly(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    out, _ = trained
    export_dir = export_last(out, tmp_path / "export")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (export_dir / part).is_dir(), part
    assert list((export_dir / "unet").glob("*.safetensors"))
    assert (export_dir / "latentforge.json").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(export_dir, local_files_only=True)
    image = pipe("a handwritten digit seven", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)

    def sample(into: Path, extra=()):
        return run_sample(
            compose_config(
                "sample",
                [
                    f"model_dir={export_dir}",
                    f"out_dir={into}",
                    "num_images_per_prompt=2",
                    "steps=4",
                    "seed=11",
                    'prompts=["a handwritten digit one","a handwritten digit two"]',
                    *extra,
                ],
            )
        )

    first, second = sample(tmp_path / "a"), sample(tmp_path / "b", ["batch_size=1"])
    assert len(first["paths"]) == 4 and Path(first["grid"]).is_file()
    for a, b in zip(first["paths"], second["paths"], strict=True):
        assert np.array_equal(np.asarray(Image_open(a)), np.asarray(Image_open(b))), "same seed, same image, any batch"
    parameters = read_parameters(first["paths"][3])
    assert (
        parameters.startswith("a handwritten digit two\n")
        and "Seed: 14" in parameters
        and "Sampler: DDIM" in parameters
    )

    other_seed = sample(tmp_path / "c", ["seed=12"])
    assert not np.array_equal(np.asarray(Image_open(first["paths"][1])), np.asarray(Image_open(other_seed["paths"][1])))


def test_half_precision_export(trained, tmp_path):
    from safetensors import safe_open

    out, _ = trained
    export_dir = export_last(out, tmp_path / "fp16", "dtype=float16")
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        with safe_open(export_dir / part / f"{name}.safetensors", "pt") as weights:
            first = next(iter(weights.keys()))
            assert weights.get_tensor(first).dtype == torch.float16, part


def test_img2img_records_its_strength(trained, tmp_path):
    out, _ = trained
    export_dir = export_last(out, tmp_path / "export", "weights=raw")
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(init)
    result = run_sample(
        compose_config(
            "sample",
            [
                f"model_dir={export_dir}",
                f"out_dir={tmp_path / 's'}",
                f"init_image={init}",
                "strength=0.5",
                "steps=4",
                "num_images_per_prompt=1",
                "grid=false",
            ],
        )
    )
    assert result["images"][0].size == (32, 32)
    assert "Denoising strength: 0.5" in read_parameters(result["paths"][0])


def test_v_prediction_zero_terminal_snr_export_samples_everywhere(latent_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run_train(
        compose_config("train", [*tiny_train_overrides(latent_dir, tmp_path / "run", steps=3), "objective=v_ztsnr"])
    )
    export_dir = export_last(tmp_path / "run", tmp_path / "export")
    pipe = StableDiffusionPipeline.from_pretrained(export_dir, local_files_only=True)
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    image = pipe("a handwritten digit one", num_inference_steps=3, guidance_rescale=0.7, output_type="np").images[0]
    assert np.isfinite(image).all()
    result = run_sample(
        compose_config(
            "sample",
            [
                f"model_dir={export_dir}",
                f"out_dir={tmp_path / 's'}",
                "steps=3",
                "num_images_per_prompt=1",
                "guidance_rescale=0.7",
            ],
        )
    )
    assert np.isfinite(np.asarray(result["images"][0])).all()
    assert "CFG Rescale phi: 0.7" in read_parameters(result["paths"][0])


def test_export_errors_name_the_problem(trained, tmp_path):
    out, _ = trained
    with pytest.raises(DataError, match=r"missing\.ckpt: checkpoint does not exist"):
        run_export(compose_config("export", [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"out_dir={tmp_path / 'e'}"]))
    with pytest.raises(DataError, match=r"vae_path '/nowhere' is not a folder"):
        run_export(
            compose_config(
                "export",
                [
                    f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
                    f"out_dir={tmp_path / 'e'}",
                    "vae_path=/nowhere",
                ],
            )
        )
    assert not (tmp_path / "e").exists()


def export_last(run_dir: Path, out_dir: Path, *overrides: str) -> Path:
    """``lf-export`` of a run's ``last.ckpt``."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    run_export(compose_config("export", [f"ckpt_path={checkpoint}", f"out_dir={out_dir}", *overrides]))
    return out_dir


def Image_open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_single_file_export_of_a_checkpoint_records_step_and_config(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.interop.pipeline_weights import read_metadata

    out, _ = trained
    folder = export_last(out, tmp_path / "folder")
    export_last(out, tmp_path / "model", "format=single_file")
    metadata = read_metadata(tmp_path / "model.safetensors")
    assert metadata["global_step"] == 5 and metadata["weights"] == "ema"
    assert metadata["train_config"]["trainer"]["max_steps"] == 5
    pipe = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(folder), local_files_only=True, safety_checker=None
    )
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).unet.state_dict()
    assert all(torch.equal(pipe.unet.state_dict()[k], reference[k]) for k in reference)


def test_sampler_loads_the_checkpoint_directly(trained, tmp_path):
    out, _ = trained
    checkpoint = out / "checkpoints" / "last.ckpt"

    def sample(model: Path, into: str, *extra: str):
        overrides = [f"model_dir={model}", f"out_dir={tmp_path / into}", "steps=3", "num_images_per_prompt=1", *extra]
        return run_sample(compose_config("sample", overrides))

    for weights in ("ema", "raw"):
        exported = sample(export_last(out, tmp_path / f"export-{weights}", f"weights={weights}"), f"e-{weights}")
        direct = sample(checkpoint, f"d-{weights}", f"weights={weights}")
        assert np.array_equal(np.asarray(Image_open(exported["paths"][0])), np.asarray(Image_open(direct["paths"][0])))
        assert f"Model: last-{weights}" in read_parameters(direct["paths"][0])
    with pytest.raises(DataError, match="weights=ema: this checkpoint holds no EMA weights"):
        from trainer.sampling.sampler import Sampler

        raw_only = torch.load(checkpoint, weights_only=True)
        del raw_only[EMA_STATE_KEY]
        torch.save(raw_only, tmp_path / "raw.ckpt")
        Sampler.from_checkpoint(tmp_path / "raw.ckpt", weights="ema")
