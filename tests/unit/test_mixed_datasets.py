"""Several latent-shard folders in one run (``data=mixed``): the draw follows the weights or repeats, a
regularization set's samples weigh ``prior_loss_weight`` in the loss, the mixed stream resumes exactly, and a
folder made with another text encoder is refused by name before training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from hydra.utils import instantiate

from data_pipelines.latents.format.keys import MANIFEST_NAME
from data_pipelines.loading.mixed import MixedLatentDataModule
from lf_common.errors import ConfigError, DataError
from tests.conftest import compose_config
from tests.integration.cli import run_in_process
from trainer.diffusion.objective import Objective

USER_ERROR_EXIT = 2
LOADER = {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 32, "seed": 3}


def copy_of(latent_dir: Path, out: Path, shards: int | None = None) -> Path:
    """A second folder of the same latents (same encoders), optionally cut to its first ``shards`` shards."""
    shutil.copytree(latent_dir, out)
    if shards is not None:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        manifest["shards"] = manifest["shards"][:shards]
        (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def drawn_indices(data: MixedLatentDataModule, batches: int) -> tuple[torch.Tensor, list[dict]]:
    """The ``dataset_index`` of every sample of the first ``batches`` training batches, and the batches."""
    loader, seen = data.train_dataloader(), []
    while len(seen) < batches:  # an epoch may be shorter: the resampled stream continues in the next
        for batch in loader:
            seen.append(batch)
            if len(seen) == batches:
                break
    return torch.cat([b["dataset_index"] for b in seen]), seen


def binomial_bound(n: int, p: float, sigmas: float = 4.0) -> float:
    """``sigmas`` standard deviations of a Binomial(n, p) count: a seeded draw outside it fails (p < 1e-4)."""
    return sigmas * math.sqrt(n * p * (1 - p))


def test_weights_3_to_1_draw_three_quarters_from_the_first(latent_dir, tmp_path):
    second = copy_of(latent_dir, tmp_path / "b")
    data = MixedLatentDataModule([{"path": str(latent_dir), "weight": 3}, {"path": str(second), "weight": 1}], **LOADER)
    assert data.probs == [0.75, 0.25] and data.epoch_samples == 192
    drawn, batches = drawn_indices(data, 40)
    n = drawn.numel()  # 640 samples
    first = int((drawn == 0).sum())
    assert abs(first - 0.75 * n) <= binomial_bound(n, 0.75), (first, n)  # 480 +- 44
    assert all(b["latents"].shape[0] == 16 and b["sample_weights"].eq(1).all() for b in batches)
    assert "caption_dropout" not in batches[0]  # no dataset sets its own


def test_repeats_2_to_1_draw_by_samples_times_repeats(latent_dir, tmp_path):
    small = copy_of(latent_dir, tmp_path / "small", shards=1)  # 32 of the 96 samples
    data = MixedLatentDataModule(
        [{"path": str(latent_dir), "repeats": 2}, {"path": str(small), "repeats": 1, "name": "few"}], **LOADER
    )
    assert data.dataset_names == [latent_dir.name, "few"]
    expected = 96 * 2 / (96 * 2 + 32)  # 6:1
    assert data.probs == pytest.approx([expected, 1 - expected]) and data.epoch_samples == 224
    drawn, _ = drawn_indices(data, 40)
    n = drawn.numel()
    assert abs(int((drawn == 0).sum()) - expected * n) <= binomial_bound(n, expected)


def test_a_reg_set_enters_the_loss_with_prior_loss_weight(latent_dir, tmp_path):
    reg = copy_of(latent_dir, tmp_path / "reg")
    data = MixedLatentDataModule(
        [{"path": str(latent_dir)}, {"path": str(reg), "is_reg": True, "caption_dropout": 0.0}],
        prior_loss_weight=0.25,
        **LOADER,
    )
    batch = drawn_indices(data, 1)[1][0]
    index, weights = batch["dataset_index"], batch["sample_weights"]
    assert 0 < int(index.sum()) < 16  # both sets in the batch
    assert torch.equal(weights, torch.where(index == 1, 0.25, 1.0))
    assert torch.isnan(batch["caption_dropout"][index == 0]).all() and batch["caption_dropout"][index == 1].eq(0).all()

    # On fixed tensors: a model predicting zeros leaves each sample's squared noise as its error (epsilon target).
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, text = batch["latents"].float(), batch["text"].float()
    torch.manual_seed(0)
    terms = Objective().loss(lambda x, t, c: torch.zeros_like(x), scheduler, latents, text, sample_weights=weights)
    torch.manual_seed(0)
    noise = torch.randn_like(latents)  # the objective's first draw
    by_hand = (noise.pow(2).mean(dim=(1, 2, 3)) * weights).mean()
    assert torch.allclose(terms.loss, by_hand) and not torch.allclose(terms.loss, noise.pow(2).mean())


def test_the_mixed_stream_resumes_mid_epoch_bit_identical(latent_dir, tmp_path):
    second = copy_of(latent_dir, tmp_path / "b", shards=1)
    datasets = [{"path": str(latent_dir), "repeats": 1}, {"path": str(second), "repeats": 3}]
    settings = {**LOADER, "num_workers": 2, "epoch_samples": 96}  # two workers, each with its own seeded draw
    reference = MixedLatentDataModule(datasets, **settings)
    _, batches = drawn_indices(reference, 9)  # epochs of 3 batches per worker x 2 workers: crosses an epoch end
    resumed = MixedLatentDataModule(datasets, **settings)
    resumed.load_state_dict({**reference.state_dict(), "batches": 7, "epoch": 1, "epoch_batches": 1})
    assert resumed._resume is not None, "the same dataset list restores the position"
    first = next(iter(resumed.train_dataloader()))
    assert set(first) == set(batches[7])
    for key in ("latents", "text", "dataset_index", "sample_weights"):
        assert torch.equal(first[key], batches[7][key]), key
    assert not torch.equal(batches[6]["latents"], batches[7]["latents"])
    changed = MixedLatentDataModule([*datasets[:1], {**datasets[1], "repeats": 2}], **settings)
    changed.load_state_dict({**reference.state_dict(), "batches": 7})
    assert changed._resume is None, "another dataset list starts afresh"


def test_a_folder_made_with_another_text_encoder_is_refused_by_name(latent_dir, tmp_path):
    other = copy_of(latent_dir, tmp_path / "other_te")
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["text_encoder"].update(fingerprint="f" * 64, path="/models/other/text_encoder")
    for shard in manifest["shards"]:
        shard["cache_key"]["text_encoder"] = "f" * 64
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    datasets = [{"path": str(latent_dir)}, {"path": str(other), "is_reg": True}]
    with pytest.raises(DataError, match=r"data\.datasets\[1\] \(.*other_te\): text_encoder differs") as refused:
        MixedLatentDataModule(datasets, **LOADER)
    assert "\n" not in str(refused.value) and "/models/other/text_encoder" in str(refused.value)
    assert f"out_dir={other}" in str(refused.value)

    # From the command line: one line, exit 2, before training; so is a missing folder.
    entries = f"[{{path:{latent_dir}}},{{path:{other},is_reg:true}}]"
    result = run_in_process(
        "lf-train", "data=mixed", f"data.datasets={entries}", f"output_dir={tmp_path / 'o'}", cwd=tmp_path
    )
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("lf-train: error: ")]
    assert len(error) == 1 and "text_encoder differs" in error[0] and "Traceback" not in result.stderr
    with pytest.raises(DataError, match=r"data\.datasets\[0\]: .*missing/manifest\.json: latent-shard manifest"):
        MixedLatentDataModule([{"path": str(tmp_path / "missing")}], **LOADER)


def test_bad_entries_are_named():
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.repeat is not a dataset setting"):
        MixedLatentDataModule([{"path": "a", "repeat": 2}], **LOADER)
    with pytest.raises(ConfigError, match="mixes weight and repeats"):
        MixedLatentDataModule([{"path": "a", "weight": 2}, {"path": "b", "repeats": 2}], **LOADER)
    with pytest.raises(ConfigError, match=r"data\.datasets\[1\]\.path is missing"):
        MixedLatentDataModule([{"path": "a"}, {"repeats": 2}], **LOADER)


def test_the_config_group_and_the_experiment_compose(latent_dir, tmp_path):
    second = copy_of(latent_dir, tmp_path / "reg")
    entries = f"[{{path:{latent_dir},repeats:2}},{{path:{second},is_reg:true,name:reg}}]"
    cfg = compose_config("train", ["data=mixed", f"data.datasets={entries}", "data.num_workers=0", "output_dir=o"])
    data = instantiate(cfg.data)
    assert isinstance(data, MixedLatentDataModule) and data.dataset_names == [latent_dir.name, "reg"]
    assert [s.is_reg for s in data.specs] == [False, True] and data.batch_size == 32  # latents.yaml's loader
    cfg = compose_config("train", ["experiment=lora_concepts", f"data.datasets.1.path={second}", "output_dir=o"])
    assert cfg.data.datasets[1].path == str(second) and cfg.data.datasets[0].repeats == 10


def test_a_datasets_caption_dropout_and_loss_reach_the_module():
    from trainer.cli.hydra_app import optimizer_factories
    from trainer.diffusion.objective import LossTerms

    cfg = compose_config("train", ["data.train_dir=x", "output_dir=o"])
    uncond = torch.full((77, 32), 7.0)
    module = instantiate(cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], uncond_text=uncond)
    module.caption_dropout = 0.0
    rates = torch.tensor([float("nan")] * 8 + [1.0] * 8)  # the model's rate (0), then a set that always drops
    drop = module.caption_drop_mask(16, torch.device("cpu"), rates)
    assert not drop[:8].any() and drop[8:].all()
    text = module.drop_captions(torch.zeros(16, 77, 32), drop)
    assert text[:8].eq(0).all() and text[8:].eq(7).all()
    assert module.caption_drop_mask(16, torch.device("cpu"), torch.full((16,), float("nan"))) is None

    module.dataset_names = ["subject", "reg"]
    terms = LossTerms(loss=torch.tensor(0.0), timesteps=torch.zeros(4), errors=torch.tensor([1.0, 2.0, 3.0, 5.0]))
    logged = module._loss_by_dataset(terms, torch.tensor([0, 1, 0, 1]))
    assert logged == {"train/loss_subject": torch.tensor(2.0), "train/loss_reg": torch.tensor(3.5)}


def test_folders_of_two_resolutions_mix_in_batches_of_one_shape(latent_dir, raw_shards, pretrained_dir, tmp_path):
    from trainer.cli.precompute import run_precompute

    small = tmp_path / "latents16"
    overrides = [f"shards={raw_shards}", f"out_dir={small}", f"pretrained={pretrained_dir}", "resolution=16"]
    run_precompute(compose_config("precompute", [*overrides, "batch_size=48"]))
    data = MixedLatentDataModule([{"path": str(latent_dir)}, {"path": str(small)}], **{**LOADER, "batch_size": 8})
    _, batches = drawn_indices(data, 16)
    shapes = {tuple(b["latents"].shape[2:]) for b in batches}
    assert shapes == {(8, 8), (4, 4)}, shapes  # both folders drawn, each batch of one shape (collate would fail)
    assert all(len(set(b["dataset_index"].tolist())) == 1 for b in batches)  # here: shape = folder
