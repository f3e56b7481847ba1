"""LoRA files users bring, each kind built from random adapters on a small model: kohya LoRA with conv layers
(LoCon), diffusers/PEFT LoRA, LyCORIS LoHa (flat and Tucker convolutions) and LoKr (one or both factors
decomposed). Each samples exactly like the adapters it was written from and trains on from the file;
other kinds are refused by name."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from lf_common.errors import DataError
from tests.small_sd import small_parts
from trainer.checkpoint.export import take_adapters
from trainer.checkpoint.keys import CHECKPOINT_KEY
from trainer.checkpoint.reading import build_unet
from trainer.interop.lora_formats import (
    kohya_state_dict,
    save_diffusers_lora,
    save_lora_files,
)
from trainer.interop.lora_loading import load_lora
from trainer.interop.lycoris import to_lycoris_file
from trainer.lora.adapters import AdapterWeights, LoraSettings, adapter_state_dict, add_lora
from trainer.modules.latent_diffusion import LatentDiffusion

UNET_TARGETS = ["to_q", "to_v", "proj_in", "conv1", "conv_shortcut"]  # attention, projection and convolutions
TEXT_TARGETS = ["q_proj", "fc1"]
KINDS = {
    "kohya_locon": ("lora", {}),
    "diffusers_peft": ("lora", {}),
    "loha": ("loha", {}),
    "loha_tucker": ("loha", {"use_effective_conv2d": True}),
    "lokr": ("lokr", {}),
    "lokr_both_decomposed": ("lokr", {"decompose_both": True}),
}
X, T, TEXT = torch.randn(1, 4, 8, 8), torch.tensor([700]), torch.randn(1, 16, 64)
IDS = torch.randint(0, 49406, (1, 16))


def _randomize_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.3)  # LoHa: a product of products, small at 0.1


def _outputs(parts) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return parts.unet(X, T, TEXT).sample, parts.text_encoder(IDS).last_hidden_state


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, tuple[torch.Tensor, torch.Tensor]]]:
    """One file per kind, and the outputs of the model that has its adapters."""
    folder = tmp_path_factory.mktemp("lora_files")
    out = {}
    for name, (kind, options) in KINDS.items():
        parts = small_parts("sd1")
        unet_settings = LoraSettings(rank=2, alpha=4.0, target_modules=UNET_TARGETS, kind=kind, options=options)
        text_options = {k: v for k, v in options.items() if k != "use_effective_conv2d"}
        text_settings = LoraSettings(rank=2, alpha=1.0, target_modules=TEXT_TARGETS, kind=kind, options=text_options)
        add_lora(parts.unet, unet_settings)
        add_lora(parts.text_encoder, text_settings)
        _randomize_adapters(parts.unet)
        _randomize_adapters(parts.text_encoder)
        unet = AdapterWeights(adapter_state_dict(parts.unet), unet_settings)
        text = AdapterWeights(adapter_state_dict(parts.text_encoder), text_settings)
        path = folder / f"{name}.safetensors"
        if name == "diffusers_peft":
            path = save_diffusers_lora(folder / name, unet, text)
        elif kind == "lora":
            save_file(kohya_state_dict(unet, text), str(path))
        else:
            save_file(
                to_lycoris_file("unet", unet.state, unet_settings)
                | to_lycoris_file("text_encoder", text.state, text_settings),
                str(path),
            )
        out[name] = (path, _outputs(parts))
    return out


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_samples_like_its_adapters_at_scale_one_and_like_the_base_at_zero(name, files):
    path, (unet_out, text_out) = files[name]
    parts = small_parts("sd1")
    base = _outputs(parts)
    assert load_lora(parts.unet, parts.text_encoder, path, scale=1.0) == ["unet", "text_encoder"]
    got = _outputs(parts)
    torch.testing.assert_close(got[0], unet_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], text_out, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapters matter
    parts.unet.set_adapters(["lora"], weights=[0.0])
    torch.testing.assert_close(parts.unet(X, T, TEXT).sample, base[0], atol=1e-6, rtol=0)


REFUSED = {
    "oft": ({"lora_unet_a_to_q.oft_blocks": torch.zeros(2, 2, 2)}, r"LyCORIS OFT adapters: not supported"),
    "glora": ({"lora_unet_a_to_q.a1.weight": torch.zeros(2, 2)}, r"LyCORIS GLoRA adapters: not supported"),
    "ia3": ({"lora_unet_a_to_q.weight": torch.zeros(2), "lora_unet_a_to_q.on_input": torch.tensor(1)},
            r"LyCORIS \(IA\)\^3 adapters"),
    "checkpoint": ({"model.diffusion_model.out.2.weight": torch.zeros(2)}, r"a model checkpoint, not a LoRA"),
    "unknown_module": ({"lora_unet_nowhere.hada_w1_a": torch.zeros(2, 2)}, r"name no module .*lora_unet_nowhere"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_kinds_are_named(name, tmp_path):
    state, message = REFUSED[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    parts = small_parts("sd1")
    with pytest.raises(DataError, match=rf"lora={path}: .*{message}"):
        load_lora(parts.unet, parts.text_encoder, path)
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(DataError, match=r"read as \.safetensors only"):
        load_lora(parts.unet, parts.text_encoder, tmp_path / "x.pt")


@pytest.mark.parametrize("name", ["kohya_locon", "loha_tucker", "lokr"])
def test_training_continues_from_a_file(name, files, tmp_path):
    """``model.lora_from=FILE``: the file's UNet adapters, as they are, are what trains; the checkpoint record
    rebuilds them, and the export writes them where ``lf-sample lora=`` reads them back."""
    path, (unet_out, _) = files[name]
    module = LatentDiffusion(
        small_parts("sd1").unet, DDPMScheduler(), partial(torch.optim.AdamW, lr=1e-2), lora_from=str(path)
    )
    torch.testing.assert_close(module.unet(X, T, TEXT).sample, unet_out, atol=1e-5, rtol=0)  # starts as the file
    trainable = {n for n, p in module.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    optimizer = module.configure_optimizers()
    module.compute_loss({"latents": torch.randn(1, 4, 8, 8), "text": TEXT}).loss.backward()
    optimizer.step()
    changed = {k for k, v in module.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".default" in k for k in changed)

    checkpoint = {"state_dict": {f"unet.{k}": v for k, v in module.unet.state_dict().items()}, CHECKPOINT_KEY: {}}
    module.on_save_checkpoint(checkpoint)
    checkpoint[CHECKPOINT_KEY]["unet_config"] = dict(module.unet.config)
    rebuilt, _ = build_unet(checkpoint)  # as export and the sampler rebuild it
    trained = module.unet(X, T, TEXT).sample.detach()
    torch.testing.assert_close(rebuilt(X, T, TEXT).sample, trained, atol=1e-6, rtol=0)
    adapters = take_adapters(checkpoint[CHECKPOINT_KEY], {"unet": rebuilt, "text_encoder": None}, split=True)
    save_lora_files(tmp_path / "lora", adapters["unet"])
    parts = small_parts("sd1")
    assert load_lora(parts.unet, parts.text_encoder, tmp_path / "lora") == ["unet"]
    torch.testing.assert_close(parts.unet(X, T, TEXT).sample, trained, atol=1e-5, rtol=0)
