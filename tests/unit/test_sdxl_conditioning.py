"""SDXL's conditioning in the latent-shard format and in the training module: per-sample size and crop
micro-conditioning stored and read back, the pooled embedding, caption dropout of both together."""

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate

from data_pipelines.latents.format import (
    POOLED_KEY,
    EncoderInfo,
    LatentManifest,
    LatentSample,
    decode_latent_sample,
    encode_latent_sample,
    micro_conditioning,
)
from data_pipelines.loading.datamodules import LatentCollate, LatentDecoder
from data_pipelines.shards.tar_writer import open_tar_writer
from lf_common.errors import ConfigError, CorruptSampleError
from tests.conftest import compose_config
from trainer.cli.hydra_app import optimizer_factories

# Three samples as bucketing and cropping leave them: each its own original size, crop and target size.
METAS = [
    {"original_size": [1080, 1920], "crop_top_left": [0, 37], "target_size": [768, 1344], "bucket": 2},
    {"original_size": [3000, 2000], "crop_top_left": [12, 0], "target_size": [1216, 832], "bucket": 0},
    {"original_size": [8, 8], "crop_top_left": [0, 0], "resolution": 32},  # a square crop of an older shard
]
TIME_IDS = [[1080, 1920, 0, 37, 768, 1344], [3000, 2000, 12, 0, 1216, 832], [8, 8, 0, 0, 32, 32]]


def sdxl_manifest() -> LatentManifest:
    info = EncoderInfo(path="/m/x", class_name="X", fingerprint="ab" * 32)
    return LatentManifest(
        resolution=32,
        latent_shape=[4, 8, 8],
        text_shape=[8, 64],
        vae=info,
        text_encoder=info,
        tokenizer_path="/m/tokenizer",
        transforms={"name": "resize_crop"},
        text_encoder_2=EncoderInfo(path="/m/text_encoder_2", class_name="CLIPTextModelWithProjection", fingerprint="c"),
        pooled_shape=[32],
    )


def test_micro_conditioning_is_stored_per_sample_and_read_back_through_a_shard(tmp_path):
    rng = np.random.default_rng(0)
    pooled = [rng.standard_normal(32).astype(np.float32) for _ in METAS]
    with open_tar_writer(tmp_path / "s.tar") as writer:
        for i, meta in enumerate(METAS):
            sample = LatentSample(f"k{i}", np.zeros((4, 8, 8)), np.zeros((8, 64)), "c", meta, pooled=pooled[i])
            writer.write(encode_latent_sample(sample))
    raw = list(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "s.tar")]), wds.tarfile_to_samples()))
    assert all(POOLED_KEY in r for r in raw)

    decoder = LatentDecoder(sdxl_manifest())
    batch = LatentCollate(decoder.names)([decoder(r) for r in raw])
    assert batch["time_ids"].dtype == torch.int64 and batch["time_ids"].tolist() == TIME_IDS
    assert batch["pooled"].shape == (3, 32) and batch["pooled"].dtype == torch.float16
    np.testing.assert_allclose(batch["pooled"].float().numpy(), np.stack(pooled), atol=3e-3)
    assert batch["text"].shape == (3, 8, 64)


def test_sdxl_sample_without_its_pooled_embedding_or_sizes_is_corrupt():
    members = encode_latent_sample(LatentSample("k", np.zeros((4, 8, 8)), np.zeros((8, 64)), "c", METAS[0]))
    members["__url__"] = "shard-3.tar"
    with pytest.raises(CorruptSampleError, match=r"shard-3\.tar: sample k: member 'pooled\.npy' is missing"):
        decode_latent_sample(members, (4, 8, 8), (8, 64), pooled_shape=(32,))
    with pytest.raises(CorruptSampleError, match=r"s: metadata 'crop_top_left' is None, expected \[int, int\]"):
        micro_conditioning({"original_size": [1, 2], "target_size": [3, 4]}, "s")


def sdxl_module(caption_dropout: float):
    cfg = compose_config("train", ["model=sdxl_tiny", "data.train_dir=unused", "output_dir=unused"])
    torch.manual_seed(0)
    return instantiate(
        cfg.model,
        optimizer=optimizer_factories(cfg)["optimizer"],
        caption_dropout=caption_dropout,
        uncond_text=torch.zeros(8, 64),
        uncond_pooled=torch.zeros(32),
    )


def sdxl_batch(size: int = 6) -> dict[str, torch.Tensor]:
    return {
        "latents": torch.randn(size, 4, 8, 8).half(),
        "text": torch.randn(size, 8, 64).half() + 3,
        "pooled": torch.randn(size, 32).half() + 3,
        "time_ids": torch.tensor([[8, 8, 0, 0, 32, 32]] * size),
    }


def test_the_unet_receives_pooled_text_and_time_ids_and_dropout_zeroes_text_and_pooled_together():
    module = sdxl_module(caption_dropout=0.5)
    seen = []
    module.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = sdxl_batch(64)
    torch.manual_seed(1)
    loss = module.compute_loss(batch).loss
    assert torch.isfinite(loss)
    (kwargs,) = seen
    text, added = kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"} and torch.equal(added["time_ids"], batch["time_ids"].float())
    text_dropped = (text == 0).all(dim=2).all(dim=1)  # (B,)
    pooled_dropped = (added["text_embeds"] == 0).all(dim=1)
    assert torch.equal(text_dropped, pooled_dropped), "a caption drops with its pooled embedding"
    assert 16 < int(text_dropped.sum()) < 48
    assert torch.equal(added["text_embeds"][~pooled_dropped], batch["pooled"][~pooled_dropped].float())


def test_sdxl_unet_and_sd_shards_refuse_each_other():
    batch = sdxl_batch()
    with pytest.raises(ConfigError, match="needs pooled text and time_ids"):
        sdxl_module(0.0).compute_loss({"latents": batch["latents"], "text": batch["text"]})
    cfg = compose_config("train", ["data.train_dir=unused", "output_dir=unused"])
    sd = instantiate(cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], caption_dropout=0.0)
    with pytest.raises(ConfigError, match="the latent shards are SDXL's"):
        sd.compute_loss({**batch, "text": batch["text"][..., :32]})


OBJECTIVES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "objective").glob("*.yaml"))


@pytest.mark.parametrize("option", OBJECTIVES)
def test_every_objective_trains_the_sdxl_unet(option):
    cfg = compose_config("train", ["model=sdxl_tiny", f"objective={option}", "data.train_dir=x", "output_dir=o"])
    module = instantiate(cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], caption_dropout=0.0)
    loss = module.compute_loss(sdxl_batch(4)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert module.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0, "the pooled text and time_ids train"


def test_bf16_weights_get_bf16_pooled_text_and_float32_time_ids():
    """What DeepSpeed's bf16 mode and ``bf16-true`` feed an SDXL UNet: inputs of its weights' dtype,
    except the time_ids (sizes up to 4096 are not exact in bfloat16; the UNet's sinusoidal projection
    computes in float32)."""
    module = sdxl_module(caption_dropout=0.0).to(torch.bfloat16)
    seen = []
    module.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = sdxl_batch(4)
    batch["time_ids"] = torch.tensor([[1037, 2049, 3, 5, 1024, 1024]] * 4)
    loss = module.compute_loss(batch).loss
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    added = seen[0]["added_cond_kwargs"]
    assert added["text_embeds"].dtype == torch.bfloat16 and seen[0]["encoder_hidden_states"].dtype == torch.bfloat16
    assert added["time_ids"].dtype == torch.float32 and added["time_ids"][0].tolist() == [1037, 2049, 3, 5, 1024, 1024]


def test_demo_with_the_sdxl_unet_writes_both_text_encoders(tmp_path):
    from omegaconf import OmegaConf

    from trainer.cli.demo import save_text_encoders

    cfg = compose_config("demo", ["train_model=sdxl_tiny", f"out_dir={tmp_path}"])
    stages = OmegaConf.to_container(cfg.stages, resolve=True)
    save_text_encoders(tmp_path / "base", cfg, stages["train"])
    assert {p.name for p in (tmp_path / "base").iterdir()} == {
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    }


def test_model_pretrained_recognises_an_sdxl_folder(tmp_path):
    tiny = compose_config("train", ["model=sdxl_tiny", "data.train_dir=x", "output_dir=o"]).model
    instantiate(tiny.unet).save_pretrained(tmp_path / "unet")
    instantiate(tiny.noise_scheduler).save_pretrained(tmp_path / "scheduler")
    cfg = compose_config("train", ["model=pretrained", f"model.pretrained={tmp_path}", "data.train_dir=x"])
    module = instantiate(cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], caption_dropout=0.0)
    assert module.sdxl
    assert torch.isfinite(module.compute_loss(sdxl_batch(2)).loss)
