"""Single-file export, diffusers' from_single_file, lf-import round trips, strict loading, pickles refused."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lf_common.errors import DataError
from tests.conftest import compose_config
from tests.pickles import CodePayload, save_original_sd_ckpt
from trainer.cli.export import run_export
from trainer.cli.hydra_app import optimizer_factories
from trainer.cli.import_model import run_import
from trainer.interop.pipeline_weights import load_diffusers_folder, read_metadata
from trainer.interop.sd_single_file import KeyMapError
from trainer.tiny_models.tiny_pipeline import make_tiny_export


@pytest.fixture(scope="module")
def export_dir(pretrained_dir, tmp_path_factory) -> Path:
    out = make_tiny_export(pretrained_dir, tmp_path_factory.mktemp("tiny") / "export")
    (out / "latentforge.json").write_text(json.dumps({"global_step": 7, "weights": "ema", "train_config": {"a": 1}}))
    return out


@pytest.fixture(scope="module")
def single_file(export_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "model.safetensors"
    run_export(
        compose_config("export", [f"ckpt_path={export_dir}", "format=single_file", "out_dir=x", f"out_file={out}"])
    )
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    parts = load_diffusers_folder(folder)
    return {
        f"{name}.{k}": v
        for name in ("unet", "vae", "text_encoder")
        for k, v in getattr(parts, name).state_dict().items()
    }


def test_single_file_has_the_original_layout_and_metadata(single_file):
    keys = load_file(single_file).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    metadata = read_metadata(single_file)
    assert (metadata["global_step"], metadata["weights"], metadata["train_config"]) == (7, "ema", {"a": 1})
    assert metadata["dtype"] == "float32" and metadata["export"].endswith("export")


def test_diffusers_from_single_file_loads_it_like_the_folder(single_file, export_dir):
    from diffusers import StableDiffusionPipeline

    from_file = StableDiffusionPipeline.from_single_file(
        str(single_file),
        config=str(export_dir),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    from_folder = StableDiffusionPipeline.from_pretrained(export_dir, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name

    def generate(pipe):
        generator = torch.Generator().manual_seed(3)
        return pipe("a digit", num_inference_steps=2, generator=generator, output_type="np").images

    assert np.array_equal(generate(from_file), generate(from_folder))


def test_fp16_single_file(export_dir, tmp_path):
    out = tmp_path / "half.safetensors"
    run_export(
        compose_config(
            "export", [f"ckpt_path={export_dir}", "format=single_file", f"out_dir={tmp_path / 'half'}", "dtype=float16"]
        )
    )
    with safe_open(str(out), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118 (a safe_open handle) == {torch.float16}


def test_export_single_file_import_export_gives_the_same_tensors(single_file, export_dir, tmp_path):
    imported = Path(
        run_import(
            compose_config(
                "import", [f"pretrained={single_file}", f"config_dir={export_dir}", f"out_dir={tmp_path / 'imp'}"]
            )
        )["out_dir"]
    )
    before, after = _tensors(export_dir), _tensors(imported)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((imported / "latentforge.json").read_text())["global_step"] == 7
    again = tmp_path / "again.safetensors"
    run_export(
        compose_config("export", [f"ckpt_path={imported}", "format=single_file", "out_dir=x", f"out_file={again}"])
    )
    first, second = load_file(single_file), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_import_from_and_to_a_bucket(single_file, export_dir, s3_bucket, tmp_path):
    """lf-import with the single file and config_dir in a bucket, out_dir in the bucket: the folder there
    holds the same tensors as the export, model_index.json among them, and records the file's URL."""
    from lf_common import object_store
    from lf_common.object_cache import cached_copy

    object_store.upload(single_file, f"{s3_bucket}/model.safetensors")
    object_store.upload_folder(export_dir, f"{s3_bucket}/configs")
    source, out = f"{s3_bucket}/model.safetensors", f"{s3_bucket}/models/imported"
    overrides = [f"pretrained={source}", f"config_dir={s3_bucket}/configs", f"out_dir={out}"]
    result = run_import(compose_config("import", [*overrides, f"cache_dir={tmp_path / 'cache'}"]))
    assert result["out_dir"] == out and object_store.exists(f"{out}/model_index.json")
    local = cached_copy(out, tmp_path / "check")
    before, after = _tensors(export_dir), _tensors(local)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((local / "latentforge.json").read_text())["imported_from"] == source


def test_training_starts_from_an_imported_folder(export_dir):
    from hydra.utils import instantiate

    cfg = compose_config(
        "train", ["model=pretrained", f"model.pretrained={export_dir}", "data.train_dir=x", "output_dir=o"]
    )
    module = instantiate(
        cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], uncond_text=None, caption_dropout=0.0
    )
    reference = load_diffusers_folder(export_dir).unet.state_dict()
    assert all(torch.equal(module.unet.state_dict()[k], reference[k]) for k in reference)
    assert module.noise_scheduler.config.beta_schedule == "squaredcos_cap_v2"


def _import(source: Path, config_dir: Path, out: Path, *extra: str) -> None:
    run_import(compose_config("import", [f"pretrained={source}", f"config_dir={config_dir}", f"out_dir={out}", *extra]))


def test_strict_loading_names_missing_extra_and_misshapen_keys(single_file, export_dir, tmp_path):
    state = load_file(single_file)
    missing_key = "model.diffusion_model.out.2.weight"
    cases = {
        "missing": ({k: v for k, v in state.items() if k != missing_key}, rf"missing keys \['{missing_key}'\]"),
        "extra": (
            {**state, "model.diffusion_model.extra.weight": torch.zeros(1)},
            r"model\.diffusion_model\.extra\.weight",
        ),
        "extra_prefix": (
            {**state, "lora_unet_down.alpha": torch.zeros(1)},
            r"unexpected keys \['lora_unet_down\.alpha'\]",
        ),
        "shape": (
            {**state, "first_stage_model.quant_conv.bias": torch.zeros(3)},
            r"first_stage_model\.quant_conv\.bias: \(3,\) in the file, \(8,\) expected",
        ),
    }
    for name, (broken, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(broken, str(path))
        with pytest.raises(KeyMapError, match=rf"{name}\.safetensors: .*{message}"):
            _import(path, export_dir, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_pickles_are_refused_and_never_executed(export_dir, tmp_path):
    marker = tmp_path / "executed"
    crafted = tmp_path / "evil.ckpt"
    with crafted.open("wb") as handle:
        pickle.dump({"state_dict": {"w": CodePayload(marker)}}, handle)
    with pytest.raises(DataError, match=r"evil\.ckpt: a pickle \(\.ckpt\) is refused .* allow_pickle=true"):
        _import(crafted, export_dir, tmp_path / "a")
    with pytest.raises(DataError, match=r"evil\.ckpt: refused: a pickle that names pathlib\.Path\.touch") as refused:
        _import(crafted, export_dir, tmp_path / "b", "allow_pickle=true")
    assert "weights_only=False" not in str(refused.value)
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plain_pickle_of_tensors_loads_with_the_flag(single_file, export_dir, tmp_path):
    checkpoint = tmp_path / "sd.ckpt"  # as the original SD checkpoints: with pytorch_lightning's callback state
    save_original_sd_ckpt(load_file(single_file), checkpoint)
    _import(checkpoint, export_dir, tmp_path / "imp", "allow_pickle=true")
    before, after = _tensors(export_dir), _tensors(tmp_path / "imp")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_our_single_file_imports_alone_and_a_foreign_odd_one_names_what_is_missing(single_file, export_dir, tmp_path):
    """Our exports carry their configs (latentforge.configs), so even the tiny demo architecture imports
    without config_dir; the same weights without that metadata do not fit SD's standard configs."""
    out = tmp_path / "alone"
    run_import(compose_config("import", [f"pretrained={single_file}", f"out_dir={out}"]))
    info = json.loads((out / "latentforge.json").read_text())
    assert info["model_type"] == "sd1" and info["configs_from"].startswith("the file's metadata")
    before, after = _tensors(export_dir), _tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    save_file(load_file(single_file), str(tmp_path / "foreign.safetensors"))
    with pytest.raises(
        KeyMapError, match=r"foreign\.safetensors: .*VAE widths \[16\] do not divide into the standard 32 norm"
    ):
        run_import(compose_config("import", [f"pretrained={tmp_path / 'foreign.safetensors'}", f"out_dir={out}2"]))


def test_sd2_text_layout_loads_in_diffusers_and_round_trips(export_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    single = tmp_path / "sd2.safetensors"
    overrides = [f"ckpt_path={export_dir}", "format=single_file", "out_dir=x", f"out_file={single}", "text_layout=sd2"]
    run_export(compose_config("export", overrides))
    state = load_file(single)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    pipe = StableDiffusionPipeline.from_single_file(
        str(single), config=str(export_dir), local_files_only=True, safety_checker=None
    )
    reference = load_diffusers_folder(export_dir).text_encoder.state_dict()
    ours = pipe.text_encoder.state_dict()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)

    # An SD 2.x file also holds OpenCLIP's last block (SD 2.x uses the penultimate layer),
    # text_projection and logit_scale: import skips exactly those, and still refuses strangers.
    extra = {
        "cond_stage_model.model.transformer.resblocks.2.ln_1.weight": torch.ones(32),
        "cond_stage_model.model.text_projection": torch.zeros(32, 32),
        "cond_stage_model.model.logit_scale": torch.zeros(()),
    }
    save_file({**state, **extra}, str(tmp_path / "full.safetensors"))
    _import(tmp_path / "full.safetensors", export_dir, tmp_path / "imp")
    before, after = _tensors(export_dir), _tensors(tmp_path / "imp")
    assert all(torch.equal(before[k], after[k]) for k in before)
    save_file(
        {**state, "cond_stage_model.model.transformer.resblocks.7.ln_1.weight": torch.ones(32)},
        str(tmp_path / "x.safetensors"),
    )
    with pytest.raises(KeyMapError, match=r"resblocks\.7\.ln_1\.weight"):
        _import(tmp_path / "x.safetensors", export_dir, tmp_path / "imp2")


def test_ldm_ema_copy_is_checked_and_can_be_chosen(single_file, export_dir, tmp_path):
    state = load_file(single_file)
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    ema = {"model_ema." + k[len("model.") :].replace(".", ""): v + 1 for k, v in unet.items()}
    save_file({**state, **ema, "model_ema.decay": torch.tensor(0.9999)}, str(tmp_path / "ema.safetensors"))
    reference = _tensors(export_dir)
    _import(tmp_path / "ema.safetensors", export_dir, tmp_path / "raw")
    raw = _tensors(tmp_path / "raw")  # once: a generator calling it per key loads the folder 200 times
    assert all(torch.equal(raw[k], reference[k]) for k in reference)
    _import(tmp_path / "ema.safetensors", export_dir, tmp_path / "ema", "ema=true")
    chosen = _tensors(tmp_path / "ema")
    assert torch.equal(chosen["unet.conv_in.weight"], reference["unet.conv_in.weight"] + 1)
    assert torch.equal(chosen["vae.quant_conv.weight"], reference["vae.quant_conv.weight"])

    dropped = "model_ema.diffusion_modelout2weight"
    save_file({**state, **{k: v for k, v in ema.items() if k != dropped}}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyMapError, match=r"no EMA copy of \['model\.diffusion_model\.out\.2\.weight'\]"):
        _import(tmp_path / "bad.safetensors", export_dir, tmp_path / "bad")
    with pytest.raises(DataError, match=r"model\.safetensors: ema=true, but the file holds no EMA weights"):
        _import(single_file, export_dir, tmp_path / "none", "ema=true")
