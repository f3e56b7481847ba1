"""Loss masks (masked loss): read beside an image or from its alpha, checked, stored in raw shards, cropped
with their image, stored at latent resolution, loaded with ones for unmasked samples, and weighting the loss."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from data_pipelines.latents.format import LatentSample, decode_latent_sample, encode_latent_sample
from data_pipelines.latents.format.manifest import ShardEntry
from data_pipelines.loading.datamodules import LatentCollate, LatentDecoder
from data_pipelines.raw.sources.image_folder import ImageFolderSource
from data_pipelines.raw.validate import problem_lines, validate_shard
from data_pipelines.raw.writer import write_raw_shards
from data_pipelines.shards.tar_writer import open_tar_writer
from data_pipelines.transforms.buckets import BucketResizeCrop, generate_buckets
from data_pipelines.transforms.masks import crop_loss_mask, latent_mask, loss_mask_for
from lf_common.errors import ConfigError, CorruptSampleError
from tests.conftest import compose_config
from trainer.cli.hydra_app import optimizer_factories
from trainer.modules.latent_diffusion import NO_LOSS_MASKS


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def half_mask(width: int, height: int) -> Image.Image:
    """0 on the left half, 255 on the right half."""
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, width // 2 :] = 255
    return Image.fromarray(array, mode="L")


def shard_members(shards: list[str]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))


def photo_folder(tmp_path, mask: Image.Image | None, size=(32, 32), mode="RGB"):
    tmp_path.mkdir()
    Image.new(mode, size, (200, 10, 10, 128)[: len(mode)]).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    if mask is not None:
        mask.save(tmp_path / "a.mask.png")
    return tmp_path


def test_a_mask_file_beside_an_image_is_stored_as_its_loss_mask(tmp_path):
    folder = photo_folder(tmp_path / "in", half_mask(32, 32))
    summary = write_raw_shards(ImageFolderSource(str(folder)), tmp_path / "shards")
    assert summary.samples == 1 and summary.masks == 1  # the mask file is no training image
    (sample,) = shard_members(summary.shards)
    mask = Image.open(io.BytesIO(sample["mask.png"]))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(half_mask(32, 32)))
    assert validate_shard(summary.shards[0]).ok


@pytest.mark.parametrize(
    ("mask", "found"),
    [(half_mask(16, 32), "mode L 16x32"), (Image.new("RGB", (32, 32)), "mode RGB 32x32")],
)
def test_a_mask_of_the_wrong_size_or_mode_is_refused_in_one_line(tmp_path, mask, found):
    folder = photo_folder(tmp_path / "in", mask)
    with pytest.raises(CorruptSampleError) as error:
        write_raw_shards(ImageFolderSource(str(folder)), tmp_path / "shards")
    message = str(error.value)
    assert "\n" not in message
    assert f"a.mask.png: loss mask is {found}, expected a grayscale (mode L) image of its image's size 32x32" in message


def test_alpha_becomes_the_mask_only_when_asked(tmp_path):
    folder = photo_folder(tmp_path / "in", None, mode="RGBA")
    plain = write_raw_shards(ImageFolderSource(str(folder)), tmp_path / "plain")
    assert plain.masks == 0 and "mask.png" not in shard_members(plain.shards)[0]
    alpha = write_raw_shards(ImageFolderSource(str(folder)), tmp_path / "alpha", mask_from_alpha=True)
    mask = Image.open(io.BytesIO(shard_members(alpha.shards)[0]["mask.png"]))
    assert alpha.masks == 1 and mask.mode == "L" and set(np.unique(np.asarray(mask))) == {128}


def test_validate_names_a_sample_whose_mask_does_not_fit(tmp_path):
    image = png(Image.new("RGB", (32, 32)))
    path = tmp_path / "shard.tar"
    with open_tar_writer(path) as writer:
        writer.write({"__key__": "good", "png": image, "txt": b"x", "mask.png": png(half_mask(32, 32))})
        writer.write({"__key__": "small", "png": image, "txt": b"x", "mask.png": png(half_mask(16, 16))})
        writer.write({"__key__": "rgb", "png": image, "txt": b"x", "mask.png": png(Image.new("RGB", (32, 32)))})
    report = validate_shard(path)
    assert report.bad_mask == ["small", "rgb"] and not report.ok
    (line,) = problem_lines([report])
    assert "small (loss mask mask.png not a grayscale (mode L) image of the image's size)" in line


def test_the_mask_takes_its_images_resize_crop_and_flip():
    # a 32x64 (h x w) image into the 24x40 bucket: resized to 24x48, center crop from column 4
    transform = BucketResizeCrop(generate_buckets(32, 8, 2.0))
    _, info = transform(Image.new("RGB", (64, 32)))
    assert info["target_size"] == [24, 40] and info["crop_top_left"] == [0, 4]
    array = np.full((32, 64), 255, dtype=np.uint8)
    array[:, :16] = 0  # the left quarter of the original: 12 resized columns, 8 after the crop
    mask = loss_mask_for(Image.fromarray(array, mode="L"), info)
    assert mask.shape == (1, 24, 40) and mask.min() >= 0 and mask.max() <= 1
    assert mask[0, :, :7].max() < 0.05 and mask[0, :, 9:].min() > 0.95
    flipped = crop_loss_mask(Image.fromarray(array, mode="L"), [32, 64], [0, 4], [24, 40], flip=True)
    assert torch.equal(flipped, mask.flip(-1))
    small = latent_mask(mask[None], (6, 10), "area")[0]  # (1, 6, 10)
    assert small[0, :, :2].max() < 0.05 and small[0, :, 2:].min() > 0.9
    assert torch.allclose(small, mask.reshape(1, 6, 4, 10, 4).mean(dim=(2, 4)))  # area: the mean of each 4x4


def test_latent_loss_masks_round_trip_and_are_checked():
    latent, text = np.zeros((4, 6, 10), np.float16), np.zeros((8, 32), np.float16)
    mask = np.linspace(0, 1, 60, dtype=np.float16).reshape(1, 6, 10)
    members = encode_latent_sample(LatentSample("k", latent, text, "c", {}, loss_mask=mask))
    assert members["loss_mask.npy"] and "mask.npy" not in members  # not the inpainting mask
    sample = {**members, "__url__": "s.tar"}
    assert np.array_equal(decode_latent_sample(sample, loss_masks=True).loss_mask, mask)
    assert decode_latent_sample(sample).loss_mask is None
    plain = encode_latent_sample(LatentSample("k", latent, text, "c", {}))
    assert decode_latent_sample({**plain, "__url__": "s.tar"}, loss_masks=True).loss_mask is None
    for bad, what in (
        (mask[:, :5], r"is float16 \(1, 5, 10\), expected float16 \(1, 6, 10\)"),
        (mask * 2, r"has values outside \[0, 1\]"),
    ):
        wrong = encode_latent_sample(LatentSample("k", latent, text, "c", {}, loss_mask=bad))
        with pytest.raises(CorruptSampleError, match=rf"s\.tar: sample k: member 'loss_mask\.npy' {what}"):
            decode_latent_sample({**wrong, "__url__": "s.tar"}, loss_masks=True)


class FakeManifest:
    """What the decoder reads of a manifest."""

    inpainting = sdxl = False
    text_shape, pooled_shape = [8, 32], []
    variant_settings, caption_variants = None, 1
    token_ids = False

    def __init__(self, loss_masks: int) -> None:
        self.loss_masks = loss_masks

    def latent_shapes(self):
        return [(4, 8, 8)]


def test_the_decoder_gives_ones_to_samples_without_a_mask():
    latent, text = np.zeros((4, 8, 8), np.float16), np.zeros((8, 32), np.float16)
    mask = np.zeros((1, 8, 8), np.float16)
    samples = [
        {**encode_latent_sample(LatentSample("a", latent, text, "", {}, loss_mask=mask)), "__url__": "s"},
        {**encode_latent_sample(LatentSample("b", latent, text, "", {})), "__url__": "s"},
    ]
    decoder = LatentDecoder(FakeManifest(loss_masks=1))
    batch = LatentCollate(decoder.names)([decoder(s) for s in samples])
    assert batch["loss_mask"].shape == (2, 1, 8, 8) and batch["loss_mask"].dtype == torch.float16
    assert batch["loss_mask"][0].eq(0).all() and batch["loss_mask"][1].eq(1).all()
    assert "loss_mask" not in LatentDecoder(FakeManifest(loss_masks=0)).names
    assert ShardEntry("s.tar", 2, "raw.tar", "").loss_masks == 0  # entries written before masks existed


def build_module(*overrides: str):
    cfg = compose_config("train", ["data.train_dir=unused", "output_dir=unused", "model.caption_dropout=0", *overrides])
    return instantiate(cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], lr_scheduler=None)


def prediction_gradient(module, batch) -> torch.Tensor:
    """The gradient of ``module``'s training loss with respect to the UNet's prediction ``(B, C, h, w)``."""
    prediction = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    module._predict = lambda noisy, timesteps, text, **_: prediction
    torch.manual_seed(0)  # the same noise and timesteps for every module
    module.compute_loss(batch).loss.backward()
    return prediction.grad


def test_the_loss_gradient_is_zero_where_masked_and_scaled_by_the_floor():
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :4] = 0  # the left half is masked out
    batch = {"latents": torch.randn(2, 4, 8, 8), "text": torch.randn(2, 8, 32), "loss_mask": mask.half()}
    unmasked = prediction_gradient(build_module(), batch)  # masked_loss=false ignores the masks
    masked = prediction_gradient(build_module("objective.masked_loss=true"), batch)
    floored = prediction_gradient(build_module("objective.masked_loss=true", "objective.mask_floor=0.25"), batch)
    assert unmasked[..., :4].abs().min() > 0
    assert torch.equal(masked[..., :4], torch.zeros_like(masked[..., :4]))
    assert torch.equal(masked[..., 4:], unmasked[..., 4:])
    assert torch.equal(floored[..., :4], 0.25 * unmasked[..., :4])  # exact: 0.25 is a power of two
    assert torch.equal(floored[..., 4:], unmasked[..., 4:])


def test_masked_loss_without_masks_is_refused_in_one_line():
    module = build_module("objective.masked_loss=true")
    batch = {"latents": torch.randn(2, 4, 8, 8), "text": torch.randn(2, 8, 32)}
    with pytest.raises(ConfigError, match=r"objective\.masked_loss=true but the training latent shards hold no loss"):
        module.compute_loss(batch)
    assert "\n" not in NO_LOSS_MASKS

    class Trainer:
        datamodule = type("DataWithoutMasks", (), {"loss_masks": False})()

    module._trainer = Trainer()
    with pytest.raises(ConfigError, match=r"set objective\.masked_loss=false"):
        module.setup("fit")
    with pytest.raises(InstantiationException) as error:  # the command line prints the ConfigError it wraps
        build_module("objective.masked_loss=true", "objective.mask_floor=1.5")
    assert str(error.value.__cause__) == "objective.mask_floor=1.5: expected a weight in [0, 1]"
