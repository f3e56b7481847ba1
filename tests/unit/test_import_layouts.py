"""Every single-file layout that circulates, built from a random small model, imported with no config_dir:
every tensor equal to the source's; every refused kind refused in one line naming its layout."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lf_common.errors import DataError
from tests.conftest import compose_config
from tests.small_sd import diffusers_tensors, original_file_state, small_configs, small_parts
from trainer.cli.import_model import run_import
from trainer.interop.import_weights import read_single_file
from trainer.interop.pipeline_weights import load_diffusers_folder, load_original_state
from trainer.interop.sd_single_file import KeyMapError

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def sd1() -> tuple[object, State]:
    parts = small_parts("sd1")
    return parts, original_file_state(parts, "sd1")


def _save(state: State, path: Path) -> Path:
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 10}, path)
    else:
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def _ema(state: State, shift: float) -> State:
    """ldm's EMA copy of the UNet (``model_ema.*``, names without dots), each weight shifted by ``shift``."""
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    return {"model_ema." + k.removeprefix("model.").replace(".", ""): v + shift for k, v in unet.items()} | {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10),
    }


def _without_text_model(state: State) -> State:
    prefix = "cond_stage_model.transformer.text_model."
    return {
        k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k: v for k, v in state.items()
    }


def _unet_shift(state: State, shift: float) -> State:
    return {k: v + shift if k.startswith("model.diffusion_model.") else v for k, v in state.items()}


SCHEDULE = {"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "logvar": torch.zeros(1000)}
EMA, EMA_ONLY = ["EMA copy beside the UNet (model_ema.*)"], "EMA-only UNet (model_ema.*)"
POSITION_IDS = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None]}
# name: (file from the original-layout state, suffix, import options, weights expected (from the state), layouts named)
LAYOUT_CASES: dict[str, tuple[Callable[[State], State], str, dict, Callable[[State], State], list[str]]] = {
    "plain": (lambda s: s, ".safetensors", {}, lambda s: s, []),
    "no_text_model": (_without_text_model, ".safetensors", {}, lambda s: s, ["CLIP text encoder without text_model."]),
    "ckpt_nested": (lambda s: s, ".ckpt", {"allow_pickle": True}, lambda s: s, ["ldm .ckpt (state_dict nesting)"]),
    "ema_and_raw": (lambda s: s | _ema(s, 1.0), ".safetensors", {}, lambda s: s, [*EMA, "non-weight extras"]),
    "ema_chosen": (lambda s: s | _ema(s, 1.0), ".safetensors", {"ema": True}, lambda s: _unet_shift(s, 1.0),
                   [*EMA, "non-weight extras"]),
    "ema_only": (lambda s: {k: v for k, v in (s | _ema(s, 1.0)).items() if not k.startswith("model.diffusion_")},
                 ".safetensors", {}, lambda s: _unet_shift(s, 1.0), [EMA_ONLY, "non-weight extras"]),
    "fp16": (lambda s: {k: v.half() for k, v in s.items()}, ".safetensors", {},
             lambda s: {k: v.half().float() for k, v in s.items()}, ["half precision (fp16/bf16)"]),
    "bf16": (lambda s: {k: v.bfloat16() for k, v in s.items()}, ".safetensors", {},
             lambda s: {k: v.bfloat16().float() for k, v in s.items()}, ["half precision (fp16/bf16)"]),
    "extras": (lambda s: s | SCHEDULE | POSITION_IDS, ".safetensors", {}, lambda s: s, ["non-weight extras"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_each_layout_imports_without_configs_and_every_tensor_matches(case, sd1, tmp_path):
    state = sd1[1]
    make, suffix, options, expected, layouts = LAYOUT_CASES[case]
    imported = read_single_file(_save(make(state), tmp_path / f"{case}{suffix}"), **options)
    reference = small_parts("sd1")  # the same seed: the source model, loaded with the expected weights
    load_original_state(reference, expected(state), "reference", "sd1")
    ours, theirs = diffusers_tensors(imported.parts), diffusers_tensors(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), [
        k for k in theirs if not torch.equal(ours[k], theirs[k])
    ]
    assert imported.info["model_type"] == "sd1" and imported.info["layouts"] == layouts
    assert len(imported.info["notes"]) == len(layouts)
    assert {k: imported.parts.unet.config[k] for k in small_configs("sd1")["unet"] if not k.startswith("_")} == {
        k: v for k, v in small_configs("sd1")["unet"].items() if not k.startswith("_")
    }


def _lora(state: State) -> State:
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}  # fmt: skip


REFUSED: dict[str, tuple[Callable[[State], State], str]] = {
    "kohya_lora": (_lora, r"kohya LoRA / LoCon layout: refused, a LoRA, not a model: sample with lf-sample lora="),
    "loha": (lambda s: {"lora_unet_a_to_q.hada_w1_a": torch.zeros(2, 2)}, r"LyCORIS LoHa layout: refused"),
    "lokr": (lambda s: {"lora_te_a_q_proj.lokr_w1": torch.zeros(2, 2)}, r"LyCORIS LoKr layout: refused"),
    "peft_lora": (lambda s: {"unet.a.to_q.lora_A.weight": torch.zeros(2, 2)}, r"diffusers/PEFT LoRA layout: refused"),
    "embedding": (lambda s: {"emb_params": torch.zeros(2, 768)},
                  r"textual inversion embedding layout: refused, a textual-inversion embedding: use lf-sample "
                  r"embeddings=FILE"),
    "embedding_sdxl": (lambda s: {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
                       r"textual inversion embedding layout: refused, a textual-inversion embedding"),
    "embedding_pt": (lambda s: {"string_to_param.*": torch.zeros(2, 768)},  # AUTOMATIC1111's .pt, as read
                     r"textual inversion embedding layout: refused, a textual-inversion embedding"),
    "embedding_diffusers": (lambda s: {"<cat-toy>": torch.zeros(768)},
                            r"textual inversion embedding layout: refused, a textual-inversion embedding"),
    "controlnet": (lambda s: {"control_model.time_embed.0.weight": torch.zeros(2, 2)}, r"ControlNet layout: refused"),
    "diffusers_unet": (lambda s: {"conv_in.weight": torch.zeros(2, 4, 3, 3)},
                       r"diffusers model file \(one part, diffusers names\) layout: refused, import the whole"),
    "vae_alone": (lambda s: {k.removeprefix("first_stage_model."): v for k, v in s.items() if k.startswith("first_")},
                  r"VAE alone \(ldm names\) layout: refused"),
    "unet_alone": (lambda s: {k: v for k, v in s.items() if k.startswith("model.")},
                   r"UNet without VAE or text encoder layout: refused"),
    "sdxl_sizes_off": (lambda s: s | {"conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2)},
                       r"a UNet block is 32 wide, not a multiple of the standard 64-wide heads"),
    "sdxl_refiner": (lambda s: s | {"conditioner.embedders.0.model.positional_embedding": torch.zeros(2, 2)},
                     r"SDXL refiner layout: refused, the SDXL refiner is out of scope"),
    "sdxl_inpainting": (lambda s: s | {"conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2),
                                       "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
                        r"SDXL inpainting checkpoint: not supported yet"),
    "pix2pix": (lambda s: s | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 8, 3, 3)},
                r"InstructPix2Pix \(SD 1\.x\) checkpoint: not supported"),
    "unknown_key": (lambda s: s | {"model.diffusion_model.extra.weight": torch.zeros(1)},
                    r"unexpected keys \['model\.diffusion_model\.extra\.weight'\]"),
    "ema_mismatch": (lambda s: s | {k: v for k, v in _ema(s, 0.0).items() if "out2weight" not in k},
                     r"EMA copy beside the UNet \(model_ema\.\*\): .*no EMA copy of \['model\.diffusion_model\.out"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_kinds_get_one_line_naming_the_layout(case, sd1, tmp_path):
    make, message = REFUSED[case]
    path = _save(make(sd1[1]), tmp_path / f"{case}.safetensors")
    with pytest.raises(KeyMapError) as error:
        read_single_file(path)
    text = str(error.value)
    assert text.startswith(str(path)) and "\n" not in text
    assert re.search(message, text), text


def test_ema_true_without_a_copy_is_refused(sd1, tmp_path):
    path = _save(sd1[1], tmp_path / "plain.safetensors")
    with pytest.raises(DataError, match=r"plain\.safetensors: ema=true, but the file holds no EMA weights"):
        read_single_file(path, ema=True)


@pytest.mark.parametrize("name", ["sd2_v", "sd1_inpainting", "sd2_inpainting"])
def test_other_types_import_with_nothing_else_and_diffusers_loads_our_export(name, tmp_path, monkeypatch):
    """``lf-import pretrained=FILE`` alone: the type detected, printed, stored; every tensor equal. Our
    single-file export of the import loads in diffusers' ``from_single_file`` and imports back alone."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from trainer.checkpoint.export import export_single_file

    parts = small_parts(name.removesuffix("_v"), seed=1)
    if name == "sd2_v":  # a UNet whose A1111 test pass reads v: output -2 everywhere, mean(-2 - 0.5) < -1
        with torch.no_grad():
            parts.unet.conv_out.weight.zero_()
            parts.unet.conv_out.bias.fill_(-2.0)
    path = _save(original_file_state(parts, name), tmp_path / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    result = run_import(compose_config("import", [f"pretrained={path}"]))
    out = Path(result["out_dir"])
    assert out == Path("models") / name and result["model_type"] == name
    info = json.loads((out / "latentforge.json").read_text())
    assert info["prediction_type"] == ("v_prediction" if name == "sd2_v" else "epsilon")
    reference = diffusers_tensors(parts)
    back = diffusers_tensors(load_diffusers_folder(out))
    assert back.keys() == reference.keys() and all(torch.equal(back[k], reference[k]) for k in reference)
    pad = "!" if name.startswith("sd2") else "<|endoftext|>"
    assert json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == pad
    inpainting = "inpainting" in name
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == pipeline_class.__name__

    exported = export_single_file(out, tmp_path / "export.safetensors")
    pipe = pipeline_class.from_single_file(str(exported), config=str(out), local_files_only=True, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        theirs = getattr(pipe, part).state_dict()
        assert all(torch.equal(theirs[k], reference[f"{part}.{k}"]) for k in theirs), part
    again = Path(run_import(compose_config("import", [f"pretrained={exported}", "out_dir=again"]))["out_dir"])
    assert json.loads((again / "latentforge.json").read_text())["model_type"] == name
    back = diffusers_tensors(load_diffusers_folder(again))
    assert all(torch.equal(back[k], reference[k]) for k in reference)
