"""Single files as ComfyUI and the files in circulation have them: the ``v_pred``/``ztsnr`` markers, SD 2.x's
whole OpenCLIP tower surviving import -> export, and weights that are not floating point refused.

ComfyUI's saver writes a top-level empty ``v_pred`` tensor into a v-prediction model, and its SDXL
loader reads the prediction type from it (``"v_pred" in state_dict``; ``ztsnr`` beside it: a
zero-terminal-SNR schedule). The assertions here apply that same rule to our files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lf_common.errors import DataError
from tests.small_sd import original_file_state, small_parts
from tests.small_sdxl import save_small_sdxl, small_sdxl_configs
from trainer.checkpoint.export import export_pipeline, export_single_file
from trainer.checkpoint.keys import CHECKPOINT_KEY
from trainer.interop.import_weights import IMPORT_INFO_NAME, import_weights
from trainer.interop.pipeline_weights import build_parts, load_diffusers_folder, original_state_dict, read_metadata
from trainer.interop.set_aside import SET_ASIDE_FILE


def _comfyui_predicts(path: Path) -> tuple[str, bool]:
    """ComfyUI's rule for an SDXL file (``supported_models.SDXL.model_type``): ``v_pred`` -> v, ``ztsnr`` -> zsnr."""
    keys = load_file(str(path)).keys()
    return ("v_prediction" if "v_pred" in keys else "epsilon"), ("v_pred" in keys and "ztsnr" in keys)


def _set_scheduler(folder: Path, **settings: object) -> None:
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | settings))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_sdxl(tmp_path_factory.mktemp("small_sdxl") / "pipe")


def test_an_sdxl_v_prediction_export_carries_comfyui_markers(sdxl_folder: Path, tmp_path: Path) -> None:
    assert _comfyui_predicts(export_single_file(sdxl_folder, tmp_path / "eps.safetensors")) == ("epsilon", False)
    v_folder = tmp_path / "v"
    save_small_sdxl(v_folder)
    _set_scheduler(v_folder, prediction_type="v_prediction")
    v_file = export_single_file(v_folder, tmp_path / "v.safetensors")
    assert _comfyui_predicts(v_file) == ("v_prediction", False)
    assert load_file(str(v_file))["v_pred"].numel() == 0  # an empty tensor, as ComfyUI's saver writes it
    _set_scheduler(v_folder, rescale_betas_zero_snr=True)
    assert _comfyui_predicts(export_single_file(v_folder, tmp_path / "z.safetensors")) == ("v_prediction", True)
    # and our own import reads the export back as v-prediction, zero terminal SNR
    out = import_weights(tmp_path / "z.safetensors", tmp_path / "z_imported")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"]) == ("v_prediction", True)


def test_a_circulating_sdxl_v_pred_file_imports_as_v_prediction(sdxl_folder: Path, tmp_path: Path) -> None:
    """An SDXL file without our metadata, with ComfyUI's top-level ``v_pred`` and ``ztsnr``: was refused
    (``unexpected keys ['v_pred']``); now imported, its prediction type and schedule taken from the markers
    (over ``config_dir``'s epsilon scheduler: the base the file was fine-tuned from)."""
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    standard = original_state_dict(build_parts(small_sdxl_configs()), "sdxl")  # SDXL base's architecture, small
    like_folder = original_state_dict(load_diffusers_folder(sdxl_folder), "sdxl")  # imported with config_dir
    for name, state, extra in (("alone", standard, {}), ("with_configs", like_folder, {"config_dir": sdxl_folder})):
        path = tmp_path / f"{name}_vpred.safetensors"
        save_file({**{k: v.contiguous() for k, v in state.items()}, **markers}, str(path))
        out = import_weights(path, tmp_path / name, **extra)
        info = json.loads((out / IMPORT_INFO_NAME).read_text())
        scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert info["prediction_type"] == "v_prediction" and "'v_pred'" in info["prediction_type_how"], name
        assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True, name
    import_weights(tmp_path / "alone_vpred.safetensors", tmp_path / "told", prediction_type="epsilon")  # user decides
    told = json.loads((tmp_path / "told" / "scheduler" / "scheduler_config.json").read_text())
    assert told["prediction_type"] == "epsilon"


def test_an_sd2_file_survives_import_then_export_with_the_same_keys(tmp_path: Path) -> None:
    """SD 2.x's own files hold OpenCLIP's whole tower; diffusers' text encoder has no place for its last block,
    ``text_projection`` and ``logit_scale``: import keeps them beside the folder, export writes them back."""
    parts = small_parts("sd2")
    original = original_file_state(parts, "sd2")
    path = tmp_path / "v2-1_512_small.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    out = import_weights(path, tmp_path / "imported", prediction_type="epsilon")
    assert (out / SET_ASIDE_FILE).is_file()
    again = export_single_file(out, tmp_path / "again.safetensors")
    written = load_file(str(again))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)
    kept = original.keys() - original_state_dict(parts, "sd2").keys()  # the last block, projection, temperature
    assert f"wrote back {len(kept)} tensors" in read_metadata(again)["set_aside"]

    # a folder that kept nothing (not imported from a single file): the export says so in its note
    (out / SET_ASIDE_FILE).unlink()
    bare = export_single_file(out, tmp_path / "bare.safetensors")
    assert "logit_scale" not in " ".join(load_file(str(bare)))
    assert read_metadata(bare)["set_aside"].startswith(f"no {SET_ASIDE_FILE} beside the base folder")


def test_a_model_trained_from_an_imported_sd2_folder_exports_what_import_set_aside(tmp_path: Path) -> None:
    """lf-train from the imported folder, then lf-export: the checkpoint's latent manifest names the folder's
    text encoder; the set-aside file beside it goes into the exported folder and back into a single file."""
    parts = small_parts("sd2")
    original = original_file_state(parts, "sd2")
    path = tmp_path / "sd2_small.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    base = import_weights(path, tmp_path / "base", prediction_type="epsilon")
    unet = load_diffusers_folder(base).unet
    record = {
        "unet_config": json.loads(json.dumps(dict(unet.config))),
        "noise_scheduler_config": json.loads((base / "scheduler" / "scheduler_config.json").read_text()),
        "latent_manifest": {
            "vae": {"path": str(base / "vae")},
            "text_encoder": {"path": str(base / "text_encoder")},
            "tokenizer_path": str(base / "tokenizer"),
        },
    }
    ckpt = tmp_path / "last.ckpt"  # what lf-train writes, reduced to what export reads
    torch.save({"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()}, CHECKPOINT_KEY: record}, ckpt)
    folder = export_pipeline(ckpt, tmp_path / "export")
    assert (folder / SET_ASIDE_FILE).is_file()
    for source in (ckpt, folder):
        written = load_file(str(export_single_file(source, tmp_path / f"{source.stem}.safetensors")))
        assert written.keys() == original.keys(), source
        assert all(torch.equal(written[key], original[key]) for key in original), source


def test_weights_that_are_not_floating_point_are_refused_by_name(tmp_path: Path) -> None:
    """kohya's writer given a wrong save dtype writes bool weights: they imported as 0/1 floats."""
    state = original_file_state(small_parts("sd1"), "sd1")
    key = "model.diffusion_model.out.2.weight"
    path = tmp_path / "bool_weights.safetensors"
    save_file({**state, key: state[key] > 0}, str(path))
    with pytest.raises(
        DataError, match=rf"bool_weights\.safetensors: 1 weights are not floating point: {key} \(bool\)"
    ):
        import_weights(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    good = tmp_path / "ok.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(good))
    folder = import_weights(good, tmp_path / "folder")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(str(unet_file))
    save_file({**unet, "conv_out.bias": torch.zeros_like(unet["conv_out.bias"], dtype=torch.int8)}, str(unet_file))
    with pytest.raises(DataError, match=r"unet: 1 weights are not floating point: conv_out\.bias \(int8\)"):
        load_diffusers_folder(folder)
