"""The text encoder trained in any run (``model.train_text_encoder=true``): the step encodes the batch's token ids
with the training encoder(s), a dropped caption becomes the empty caption's ids, adapters or full weights train
with their own parameter group, SDXL trains both encoders, and the encoders come from the shards' manifest,
refused when they are not the ones that made the shards."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from data_pipelines.latents.encoders import fingerprint_folder
from data_pipelines.latents.format import EncoderInfo, LatentManifest
from data_pipelines.latents.text_encoding import TextEncoding, chunked_token_ids, encode_token_ids
from lf_common.errors import ConfigError
from tests.conftest import compose_config
from trainer.cli.hydra_app import optimizer_factories
from trainer.modules.latent_diffusion import LatentDiffusion
from trainer.modules.text_encoder_training import TextEncoderParts, shard_text_encoders
from trainer.tiny_models.tiny_sdxl_text_encoders import save_tiny_sdxl_text_encoders

EMBEDDINGS = "embeddings.token_embedding.weight"  # transformers 5: no text_model level
OPTIM = ["optim.lr=1e-3", "optim.text_encoder_lr=1e-2"]
CAPTIONS = ["a handwritten digit 1", "a handwritten digit 7", "a digit", "seven"]
TE_LORA = {
    "_target_": "trainer.lora.adapters.LoraSettings",
    "rank": 2,
    "alpha": 2.0,
    "target_modules": ["q_proj", "v_proj"],
}


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL's tiny pair, 8 tokens (the first encoder and tokenizer are also SD's tiny ones)."""
    return save_tiny_sdxl_text_encoders(tmp_path_factory.mktemp("te"), max_length=8)


def parts(folder: Path, sdxl: bool = False) -> TextEncoderParts:
    second = (CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
              CLIPTokenizer.from_pretrained(folder / "tokenizer_2")) if sdxl else (None, None)  # fmt: skip
    return TextEncoderParts(CLIPTextModel.from_pretrained(folder / "text_encoder"),
                            CLIPTokenizer.from_pretrained(folder / "tokenizer"), *second)  # fmt: skip


def build(folder: Path, sdxl: bool = False, **overrides) -> LatentDiffusion:
    model = "model=sdxl_tiny" if sdxl else "model=tiny"
    cfg = compose_config("train", ["data.train_dir=unused", "output_dir=unused", model, *OPTIM])
    torch.manual_seed(0)
    module = instantiate(
        cfg.model,
        optimizer=optimizer_factories(cfg, param_groups=True)["optimizer"],
        param_groups=optimizer_factories(cfg, param_groups=True)["param_groups"],
        lr_scheduler=None,
        train_text_encoder=True,
        text_encoders=parts(folder, sdxl),
        **overrides,
    )
    module._setup_token_ids(datamodule(module))
    return module


def datamodule(module: LatentDiffusion, holds_ids: bool = True) -> SimpleNamespace:
    """What the latent data modules expose for token ids: the flag and the empty caption's ids ``(1, L)``."""
    uncond = [chunked_token_ids(t, [""])[0] for t in (module.tokenizer, module.tokenizer_2) if t is not None]
    return SimpleNamespace(token_ids=holds_ids, manifest=None, uncond_token_ids=uncond[0],
                           uncond_token_ids_2=uncond[1] if len(uncond) > 1 else None)  # fmt: skip


def batch(module: LatentDiffusion, captions: list[str] = CAPTIONS) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    size = len(captions)
    data = {"latents": torch.randn(size, 4, 8, 8), "text": torch.zeros(size, 8, 32),
            "token_ids": chunked_token_ids(module.tokenizer, captions)}  # fmt: skip
    if module.sdxl:
        data.update(text=torch.zeros(size, 8, 64), pooled=torch.zeros(size, 32), time_ids=torch.ones(size, 6) * 32,
                    token_ids_2=chunked_token_ids(module.tokenizer_2, captions))  # fmt: skip
    return data


def test_the_step_conditions_on_the_encoded_ids_and_trains_the_encoder(encoders_dir: Path):
    module = build(encoders_dir, caption_dropout=0.0)
    data = batch(module)
    encoded = module.encode_token_ids(data)["text"]
    with torch.no_grad():
        assert torch.equal(encoded, encode_token_ids(module.text_encoder, data["token_ids"]))
    module.compute_loss(data).loss.backward()
    grads = [p.grad for p in module.text_encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert (
        {"unet", "text_encoder", "embeddings"} <= set(groups)
        and groups["text_encoder"]["lr"] == 1e-2
        and groups["unet"]["lr"] == 1e-3
    )
    assert {name.split(".")[0] for name, _ in module.named_parameters()} == {"unet", "text_encoder"}


def test_a_dropped_caption_is_the_empty_captions_ids_encoded_by_the_current_encoder(encoders_dir: Path):
    module = build(encoders_dir, caption_dropout=1.0)
    data = batch(module)
    drop = torch.tensor([True, False, True, False])
    text = module.encode_token_ids(data, drop)["text"]
    with torch.no_grad():
        empty = encode_token_ids(module.text_encoder, chunked_token_ids(module.tokenizer, [""]))[0]
        own = encode_token_ids(module.text_encoder, data["token_ids"])
    assert torch.equal(text[0], empty) and torch.equal(text[2], empty)
    assert torch.equal(text[1], own[1]) and not torch.equal(text[1], empty)
    seen = []
    module.unet.register_forward_pre_hook(lambda _, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True)
    module.compute_loss(data)  # caption_dropout=1: every sample's conditioning is the empty caption's
    assert torch.allclose(seen[0], empty.expand(4, -1, -1))


def test_adapters_train_alone_and_the_checkpoint_records_them(encoders_dir: Path):
    module = build(encoders_dir, text_encoder_lora=TE_LORA)
    trained = {n for n, p in module.text_encoder.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["latentforge"]["text_encoder_lora"]["rank"] == 2


def test_sdxl_trains_both_encoders_and_the_pooled_embedding_comes_from_the_second(encoders_dir: Path):
    module = build(encoders_dir, sdxl=True, caption_dropout=0.0)
    data = batch(module)
    encoded = module.encode_token_ids(data)
    assert encoded["text"].shape == (4, 8, 64) and encoded["pooled"].shape == (4, 32)
    module.compute_loss(data).loss.backward()
    for encoder in (module.text_encoder, module.text_encoder_2):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    last = getattr(module.text_encoder, "text_model", module.text_encoder).encoder.layers[
        -1
    ]  # SDXL reads the penultimate layer: the last is idle
    assert not any(p.requires_grad for p in last.parameters())
    names = {g["name"] for g in module.configure_optimizers().param_groups}
    assert {"text_encoder", "text_encoder_2"} <= names


def test_shards_without_ids_and_missing_encoders_are_refused_in_one_line(encoders_dir: Path):
    module = build(encoders_dir)
    with pytest.raises(ConfigError, match="lf-precompute keep_token_ids=true"):
        module._setup_token_ids(datamodule(module, holds_ids=False))
    data = batch(module)
    del data["token_ids"]
    module.eval()
    with pytest.raises(ConfigError, match="validation latent shards hold none"):
        module.encode_token_ids(data)
    cfg = compose_config("train", ["data.train_dir=unused", "output_dir=unused", "model.train_text_encoder=true"])
    adapters_alone = {"train_text_encoder": False, "text_encoder_lora": TE_LORA}
    for overrides, message in (
        ({}, "needs model.text_encoders"),
        (adapters_alone, "set model.train_text_encoder=true"),
    ):
        with pytest.raises(InstantiationException) as refused:  # the commands print the ConfigError it wraps
            instantiate(cfg.model, optimizer=None, **{"text_encoders": None, **overrides})
        assert isinstance(refused.value.__cause__, ConfigError) and message in str(refused.value.__cause__)


def _manifest(folder: Path, encoder_dir: Path) -> None:
    encoder = encoder_dir / "text_encoder"
    info = EncoderInfo(str(encoder), "CLIPTextModel", fingerprint_folder(encoder))
    vae = EncoderInfo("unused", "AutoencoderKL", "")
    manifest = LatentManifest(32, [4, 8, 8], [8, 32], vae, info, str(encoder_dir / "tokenizer"), {})
    manifest.save(folder)


def test_the_encoders_are_the_shards_own_or_refused(encoders_dir: Path, tmp_path: Path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _manifest(shards, encoders_dir)
    assert shard_text_encoders(False, str(shards)) is None  # not trained: nothing loaded
    loaded = shard_text_encoders(True, str(shards))
    assert loaded is not None and loaded.text_encoder_2 is None
    ours = CLIPTextModel.from_pretrained(encoders_dir / "text_encoder").state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.text_encoder.state_dict().items())
    assert shard_text_encoders(True, None, [{"path": str(shards)}]) is not None  # data=mixed: the first dataset's
    with pytest.raises(ConfigError, match=r"data\.train_dir"):
        shard_text_encoders(True, None, None)
    online = shard_text_encoders(True, online=str(encoders_dir))  # data=images_online: its folder's encoder
    assert online is not None and torch.equal(online.text_encoder.get_input_embeddings().weight, ours[EMBEDDINGS])
    assert TextEncoding.recorded(None) == TextEncoding()


def test_a_trained_export_continues_and_another_tokenizer_is_refused(encoders_dir, tmp_path, caplog):
    """model.text_encoders.pretrained = an earlier export whose encoder trained (its tokenizer re-saved, as lf-export
    writes it): the step re-encodes the shards' ids, so the run continues from that encoder, with one log line; a
    tokenizer whose ids mean other tokens (another model_max_length, vocabulary) is refused in one line."""
    shards = tmp_path / "shards"
    shards.mkdir()
    _manifest(shards, encoders_dir)
    export = tmp_path / "export"
    model = CLIPTextModel.from_pretrained(encoders_dir / "text_encoder")
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)  # the export's encoder trained
    model.save_pretrained(export / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(encoders_dir / "tokenizer")
    tokenizer.save_pretrained(export / "tokenizer")
    assert fingerprint_folder(export / "tokenizer") != fingerprint_folder(encoders_dir / "tokenizer")  # re-saved
    with caplog.at_level("INFO", logger="trainer.modules.text_encoder_training"):
        loaded = shard_text_encoders(True, str(shards), pretrained=str(export))
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight, model.get_input_embeddings().weight)
    (line,) = [r.getMessage() for r in caplog.records if "fingerprint differs" in r.getMessage()]
    assert "trains on from its own weights" in line and "\n" not in line
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(export / "tokenizer")
    with pytest.raises(
        ConfigError, match=r"not the tokenizer that made the latent shards .*its model_max_length"
    ) as no:
        shard_text_encoders(True, str(shards), pretrained=str(export))
    assert "\n" not in str(no.value)
    tokenizer.model_max_length = 8
    tokenizer.add_tokens(["<new>"])
    tokenizer.save_pretrained(export / "tokenizer")
    with pytest.raises(ConfigError, match=r"its vocabulary differ"):
        shard_text_encoders(True, str(shards), pretrained=str(export))


def _loss_after_training(module: LatentDiffusion, data: dict[str, torch.Tensor], steps: int) -> float:
    """The loss on ``data`` at fixed noise after ``steps`` optimizer steps on it."""
    optimizer = module.configure_optimizers()
    for _ in range(steps):
        torch.manual_seed(1000)  # the same noise and timesteps each step: the batch is learned by heart
        optimizer.zero_grad()
        module.compute_loss(data).loss.backward()
        optimizer.step()
    torch.manual_seed(1000)
    with torch.no_grad():
        return module.compute_loss(data).loss.item()


def test_the_encoders_alone_learn_to_condition_a_frozen_unet(encoders_dir: Path):
    """With the (SDXL) UNet frozen, any drop of the loss on a fixed batch (fixed noise) is the encoders' learning: it
    falls by more than a tenth in 30 steps (0.80 of it, measured), while the frozen encoders' conditioning (what the
    shards hold) leaves it where it was; only the encoders' weights changed."""
    module = build(encoders_dir, sdxl=True, caption_dropout=0.0)
    module.unet.requires_grad_(False)
    data = batch(module)
    unet = {k: v.clone() for k, v in module.unet.state_dict().items()}
    encoders = torch.nn.ModuleList(module.trained_text_encoders())
    base = {k: v.clone() for k, v in encoders.state_dict().items()}
    with torch.no_grad():
        stored = {**data, **module.encode_token_ids(data)}
        torch.manual_seed(1000)
        before = module.compute_loss(data).loss.item()
    after = _loss_after_training(module, data, 30)
    changed = {k.split(".")[0] for k, v in encoders.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"0", "1"} and all(torch.equal(v, unet[k]) for k, v in module.unet.state_dict().items())
    assert after < 0.9 * before, (after, before)
    # the frozen encoders: the shards' states, and the loss where it started
    module.train_text_encoder = False
    torch.manual_seed(1000)
    with torch.no_grad():
        assert module.compute_loss(stored).loss.item() == pytest.approx(before, rel=1e-6)


def test_textual_inversion_and_dreambooth_refuse_the_switch():
    """Both encode their own prompts; the switch trains on shards' ids."""
    from trainer.modules.dreambooth import DreamBoothDiffusion
    from trainer.modules.textual_inversion import TextualInversionDiffusion

    cfg = compose_config("train", ["data.train_dir=unused", "output_dir=unused"])
    parts = {"unet": instantiate(cfg.model.unet), "noise_scheduler": instantiate(cfg.model.noise_scheduler)}
    with pytest.raises(ConfigError, match="experiment=dreambooth_text_encoder"):
        DreamBoothDiffusion(**parts, optimizer=None, train_text_encoder=True)
    with pytest.raises(ConfigError, match="leave it false"):
        TextualInversionDiffusion(**parts, optimizer=None, text_encoder=None, tokenizer=None, textual_inversion={},
                                  train_text_encoder=True)  # fmt: skip


def test_the_plan_counts_the_trained_encoder_from_its_config():
    """``lf-train plan=true model.train_text_encoder=true``: the encoder is built from the base's config, no weights."""
    from trainer.cli.plan_run import meta_module

    overrides = ["plan.enabled=true", "model=pretrained", "plan.base=sd1", "plan.latent_size=8"]
    module = meta_module(compose_config("train", [*overrides, "model.train_text_encoder=true"]))
    assert module.text_encoder.device.type == "meta"
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trained > 980e6  # SD 1.x's UNet (860 M) and CLIP ViT-L (123 M), both trained
    with pytest.raises(ConfigError, match=r"plan\.base=sd1"):
        meta_module(compose_config("train", ["plan.enabled=true", "model.train_text_encoder=true"]))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_with_clip_skip_every_trainable_encoder_weight_gets_a_gradient(encoders_dir: Path, clip_skip: int):
    """The shards' clip_skip=k reads hidden_states[-k]: the last k-1 layers are frozen in setup (DDP with
    find_unused_parameters=false fails on trainable weights without a gradient), the rest still train."""
    module = build(encoders_dir, caption_dropout=0.0)
    extra = {"text_encoder": SimpleNamespace(extra={"clip_skip": clip_skip})}
    module._setup_token_ids(SimpleNamespace(**{**vars(datamodule(module)), "manifest": SimpleNamespace(**extra)}))
    module.compute_loss(batch(module)).loss.backward()
    trainable = {n: p for n, p in module.text_encoder.named_parameters() if p.requires_grad}
    assert trainable and [n for n, p in trainable.items() if p.grad is None] == []
    frozen_layers = {n.split("layers.")[1].split(".")[0] for n, p in module.text_encoder.named_parameters()
                     if "layers." in n and not p.requires_grad}  # fmt: skip
    assert len(frozen_layers) == clip_skip - 1


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_the_step_needs_no_precomputed_text(encoders_dir: Path, sdxl: bool):
    """``data.skip_text`` batches (``model.train_text_encoder=true``) hold ids but no ``text`` (nor ``pooled``)."""
    module = build(encoders_dir, sdxl=sdxl, caption_dropout=0.5)
    full = batch(module)
    lean = {key: value for key, value in full.items() if key not in ("text", "pooled")}
    torch.manual_seed(2)
    expected = module.compute_loss(full).loss
    torch.manual_seed(2)
    loss = module.compute_loss(lean).loss
    assert torch.equal(loss, expected)  # the precomputed text was never read


def test_sd_encoder_adapters_alone_train_and_the_export_loads_in_the_sampler(encoders_dir: Path, tmp_path: Path):
    """SD 1.x, ``model.train_text_encoder=true`` with ``model.text_encoder_lora`` (the UNet trains fully): after two
    steps only the encoder's adapters changed in it (its base weights bit-identical), and lf-export's LoRA files
    (diffusers' ``text_encoder.*``, kohya's ``lora_te_*``) load in the sampler (``lf-sample lora=``) to the
    encoder that trained."""
    from safetensors.torch import load_file

    from tests.conftest import save_tiny_vae
    from trainer.checkpoint.export import export_pipeline
    from trainer.checkpoint.keys import CHECKPOINT_KEY
    from trainer.interop.lora_formats import KOHYA_LORA_FILE
    from trainer.sampling.loading import load_lora_file
    from trainer.sampling.sampler import Sampler

    module = build(encoders_dir, text_encoder_lora=TE_LORA, caption_dropout=0.0)
    data = batch(module)
    before = {k: v.clone() for k, v in module.text_encoder.state_dict().items()}
    optimizer = module.configure_optimizers()
    for _ in range(2):
        optimizer.zero_grad()
        module.compute_loss(data).loss.backward()
        optimizer.step()
    changed = {k for k, v in module.text_encoder.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)

    save_tiny_vae(tmp_path)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 2, CHECKPOINT_KEY: {"latent_manifest": {
        "vae": {"path": str(tmp_path / "vae")}, "text_encoder": {"path": str(encoders_dir / "text_encoder")},
        "tokenizer_path": str(encoders_dir / "tokenizer")}}}  # fmt: skip
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    export = export_pipeline(tmp_path / "last.ckpt", tmp_path / "export")
    assert {key.split("_")[1] for key in load_file(export / "lora" / KOHYA_LORA_FILE)} == {"te"}  # the UNet: unet/
    assert {key.split(".")[0] for key in load_file(export / "lora" / "pytorch_lora_weights.safetensors")} == {
        "text_encoder"
    }
    ids = data["token_ids"][:, 0]  # (B, L)
    with torch.no_grad():
        trained = module.text_encoder(ids).last_hidden_state
    for file in ("pytorch_lora_weights.safetensors", KOHYA_LORA_FILE):
        sampler = Sampler.from_export(export, device="cpu")
        with torch.no_grad():
            base = sampler.text_encoder(ids).last_hidden_state
        assert load_lora_file(export / "lora" / file, sampler.unet, [sampler.tokenizer], [sampler.text_encoder]) == []
        with torch.no_grad():
            loaded = sampler.text_encoder(ids).last_hidden_state
        assert not torch.allclose(base, trained, atol=1e-4)  # the adapters matter
        torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
