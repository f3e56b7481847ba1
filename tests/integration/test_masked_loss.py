"""Masked loss end to end: loss masks beside images go through lf-shards and lf-precompute aligned with their
image (square and bucketed), and a masked-out bar is not learned where the same run without the mask learns it."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.latents.format import LatentManifest
from tests.conftest import compose_config
from trainer.cli.precompute import run_precompute
from trainer.cli.shards import run_shards

pytestmark = pytest.mark.slow


def write_folder(folder, images: dict[str, tuple[Image.Image, Image.Image | None]]) -> None:
    """``NAME.png``, ``NAME.txt`` and, when given, ``NAME.mask.png`` for each entry."""
    folder.mkdir()
    for name, (image, mask) in images.items():
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo called {name}")
        if mask is not None:
            mask.save(folder / f"{name}.mask.png")


def mask_columns(height: int, width: int, zero_until: int) -> Image.Image:
    """A mode L mask of ``height`` x ``width``: 0 left of column ``zero_until``, 255 from it."""
    array = np.full((height, width), 255, dtype=np.uint8)
    array[:, :zero_until] = 0
    return Image.fromarray(array, mode="L")


def photo(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 1000 + width)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def stored_masks(latents) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``source_path -> (latent, loss mask or None)`` of every sample in a latent-shard folder."""
    import json

    urls = LatentManifest.load(latents).shard_paths(latents)
    found = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"])
        mask = np.load(io.BytesIO(sample["loss_mask.npy"])) if "loss_mask.npy" in sample else None
        found[meta["source_path"]] = (np.load(io.BytesIO(sample["latent.npy"])), mask)
    return found


def shards_then_latents(tmp_path, pretrained_dir, precompute: list[str]):
    run_shards(compose_config("shards", ["source=folder", f"source.root={tmp_path / 'in'}", f"out_dir={tmp_path}/raw"]))
    overrides = [f"shards={tmp_path / 'raw'}", f"out_dir={tmp_path / 'latents'}", f"pretrained={pretrained_dir}"]
    run_precompute(compose_config("precompute", [*overrides, "batch_size=4", *precompute]))
    return tmp_path / "latents"


def test_a_half_mask_becomes_the_latent_half_mask(tmp_path, pretrained_dir):
    write_folder(
        tmp_path / "in",
        {"half": (photo(32, 32), mask_columns(32, 32, 16)), "plain": (photo(32, 32), None)},
    )
    latents = shards_then_latents(tmp_path, pretrained_dir, ["resolution=32"])
    assert LatentManifest.load(latents).loss_masks == 1
    stored = stored_masks(latents)
    latent, mask = stored["half.png"]
    expected = np.zeros((1, 8, 8), np.float16)
    expected[..., 4:] = 1  # the VAE's factor is 4: pixel columns 16-31 are latent columns 4-7
    assert latent.shape == (4, 8, 8) and mask.dtype == np.float16 and np.array_equal(mask, expected)
    assert stored["plain.png"][1] is None  # no mask, no member: the loader gives it ones


def test_masks_follow_their_image_into_its_bucket(tmp_path, pretrained_dir):
    # wide 32x64 -> bucket 24x40 (resized to 24x48, center crop from column 4); tall 64x32 -> bucket 40x24
    write_folder(
        tmp_path / "in",
        {"wide": (photo(32, 64), mask_columns(32, 64, 16)), "tall": (photo(64, 32), mask_columns(64, 32, 16))},
    )
    latents = shards_then_latents(tmp_path, pretrained_dir, ["buckets=tiny"])
    stored = stored_masks(latents)
    wide_latent, wide = stored["wide.png"]
    assert wide_latent.shape == (4, 6, 10) and wide.shape == (1, 6, 10)
    # 16 of 64 columns masked -> 12 of 48 resized -> 8 of the 40 cropped (the crop's offset counts) -> 2 latent
    assert wide[..., :2].max() < 0.05 and wide[..., 2:].min() > 0.95
    tall_latent, tall = stored["tall.png"]
    assert tall_latent.shape == (4, 10, 6) and tall.shape == (1, 10, 6)
    assert tall[..., :3].max() < 0.05 and tall[..., 3:].min() > 0.95  # half of 24 columns, no crop
    # masks stay aligned through training's loader too: the batch's loss_mask is the stored one
    from data_pipelines.loading.datamodules import LatentShardDataModule

    data = LatentShardDataModule(str(latents), batch_size=1, num_workers=0, shuffle_buffer=0, resampled=False)
    batches = list(data.train_dataloader())
    assert data.loss_masks and len(batches) == 2
    shapes = {tuple(b["latents"].shape[-2:]): b["loss_mask"] for b in batches}
    assert torch.equal(shapes[(6, 10)][0], torch.from_numpy(wide))
