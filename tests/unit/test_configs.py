"""Every option of every config group composes and instantiates."""

import contextlib

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from tests.conftest import compose_config
from trainer.cli.hydra_app import CONF_MODULE, conf_folder, instantiate_group, optimizer_factories

CONF = conf_folder()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_primary_config_composes():
    required = {
        "train": ["data.train_dir=x", "output_dir=o"],
        "train_autoencoder": ["data.shards=x", "output_dir=o"],
        "shards": ["out_dir=o"],
        "precompute": ["shards=x", "out_dir=o", "pretrained=p"],
        "export": ["ckpt_path=c", "out_dir=o"],
        "sample": ["model_dir=m", "out_dir=o"],
        "import": ["pretrained=s", "out_dir=o"],
        "validate": ["shards=x"],
        "demo": [],
        "sweep_summary": ["sweep_dir=s"],
        "eval": ["model_dir=m", "out_dir=o"],
        "dedup": ["shards=x", "out_dir=o"],
    }
    for name, overrides in required.items():
        cfg = compose_config(name, overrides)
        assert cfg.task_name in (name, "demo"), name


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options_compose(option):
    data = ["data.train_dir=x"]
    if option.startswith("dreambooth"):
        data = ["model.pretrained=p", "data.instance_dir=i", "data.instance_prompt=a photo of sks cat"]
    cfg = compose_config("train", [f"experiment={option}", *data, "output_dir=o"])
    assert cfg.optimized_direction in ("minimize", "maximize")
    assert cfg.trainer.max_steps > 0
    if option.startswith("dreambooth"):
        assert cfg.data.pretrained == "p" and cfg.model.unet.path == "p" and "prepare" not in cfg


@pytest.mark.parametrize("option", options("hparams_search"))
def test_hparams_search_options_compose(option):
    from hydra import compose, initialize_config_module

    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        cfg = compose("train", [f"hparams_search={option}", "data.train_dir=x"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.startswith("hydra_plugins.latentforge_sweepers.")
    assert cfg.hydra.sweeper.storage.startswith("sqlite:///") and cfg.hydra.sweeper.params
    assert cfg.callbacks.optuna_pruning.monitor == cfg.optimized_metric and cfg.optuna_trial_number is None


@pytest.mark.parametrize("option", options("optim"))
def test_optim_options(option):
    import torch

    from trainer.cli.hydra_app import optimizer_factories

    if option == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="optim=adamw8bit needs latentforge[lowbit]")
    cfg = compose_config("train", [f"optim={option}", "data.train_dir=x", "output_dir=o"])
    factory = optimizer_factories(cfg)["optimizer"]
    assert isinstance(factory(params=[torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)


@pytest.mark.parametrize("option", options("lr_scheduler"))
def test_lr_scheduler_options(option):
    import torch

    cfg = compose_config("train", [f"lr_scheduler={option}", "data.train_dir=x", "output_dir=o"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = instantiate(cfg.lr_scheduler)(optimizer=optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("option", options("model"))
def test_model_options(option, tmp_path):
    from trainer.modules.latent_diffusion import LatentDiffusion

    extra = []
    if option == "pretrained":  # a diffusers folder with unet/ and scheduler/, as lf-export writes
        tiny = compose_config("train", ["data.train_dir=x", "output_dir=o"]).model
        instantiate(tiny.unet).save_pretrained(tmp_path / "unet")
        instantiate(tiny.noise_scheduler).save_pretrained(tmp_path / "scheduler")
        extra = [f"model.pretrained={tmp_path}"]
    cfg = compose_config("train", [f"model={option}", "data.train_dir=x", "output_dir=o", *extra])
    # SDXL's 2.6 B parameters are built without memory (the meta device): its architecture is what is checked
    with torch.device("meta") if option == "sdxl" else contextlib.nullcontext():
        module = instantiate(
            cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], uncond_text=None, caption_dropout=0.0
        )
    assert isinstance(module, LatentDiffusion)
    assert module.unet.training and module.noise_scheduler.config.clip_sample is False
    if option == "sdxl":  # SDXL base 1.0's UNet: 2,567,463,684 parameters
        assert sum(p.numel() for p in module.unet.parameters()) == 2_567_463_684
        assert module.sdxl and module.hparams.gradient_checkpointing
    if option == "sdxl_tiny":
        assert module.sdxl and module.unet.config.cross_attention_dim == 64


@pytest.mark.parametrize("option", options("autoencoder"))
def test_autoencoder_options(option):
    from trainer.modules.autoencoder import AutoencoderModule

    cfg = compose_config("train_autoencoder", [f"autoencoder={option}", "data.shards=x", "output_dir=o"])
    assert isinstance(instantiate(cfg.autoencoder, optimizer=optimizer_factories(cfg)["optimizer"]), AutoencoderModule)


@pytest.mark.parametrize("option", options("strategy"))
def test_strategy_options_build_a_trainer(option, tmp_path):
    import lightning as L

    cfg = compose_config(
        "train", [f"strategy={option}", "data.train_dir=x", f"output_dir={tmp_path}", "trainer.accelerator=cpu"]
    )
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer, L.Trainer)
    expected = {"single": "SingleDeviceStrategy", "ddp": "DDPStrategy", "fsdp": "CpuFSDPStrategy"}
    assert type(trainer.strategy).__name__ == expected.get(option, "CpuDeepSpeedStrategy")


def test_sharded_fsdp_checkpoints_are_refused_with_what_to_use(tmp_path):
    from lf_common.errors import ConfigError

    overrides = [
        "strategy=fsdp",
        "trainer.strategy.state_dict_type=sharded",
        "data.train_dir=x",
        f"output_dir={tmp_path}",
    ]
    cfg = compose_config("train", overrides)
    with pytest.raises(Exception) as raised:
        instantiate(cfg.trainer, logger=False, callbacks=[])
    error = raised.value if isinstance(raised.value, ConfigError) else raised.value.__cause__
    assert isinstance(error, ConfigError), raised.value
    assert "trainer.strategy.state_dict_type=sharded" in str(error) and "state_dict_type=full" in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options(option, tmp_path):
    overrides = [f"callbacks={option}", "data.train_dir=x", f"output_dir={tmp_path}"]
    if option == "with_validation_images":
        overrides.append("callbacks.validation_images.prompts=[a cat]")
    if option == "with_image_metrics":  # the default features need the Inception file: the digits' here
        overrides += ["callbacks.image_metrics.prompts=[a cat,a dog]"]  # FID and KID need 2 images or more
        overrides += ["features@callbacks.image_metrics.features=digits"]
        overrides += ["callbacks.image_metrics.reference={_target_: trainer.evaluation.reference.DigitsReference}"]
    cfg = compose_config("train", overrides)
    callbacks = instantiate_group(cfg.callbacks)
    assert any(type(c).__name__ == "AtomicModelCheckpoint" for c in callbacks)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [f"logger={option}", "data.train_dir=x", f"output_dir={tmp_path}"]
    if "wandb" in option:
        overrides.append("logger.wandb.offline=true")
    loggers = instantiate_group(compose_config("train", overrides).logger)
    expected = {
        "none": [],
        "csv": ["CSVLogger"],
        "wandb": ["WandbLogger"],
        "csv_wandb": ["CSVLogger", "WandbLogger"],
        "tensorboard": ["TensorBoardLogger"],
    }
    assert sorted(type(lg).__name__ for lg in loggers) == expected[option]


def test_source_options(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\n")
    for option, extra in (
        ("digits", []),
        ("folder", [f"source.root={tmp_path}"]),
        ("table", [f"source.table={tmp_path / 't.csv'}"]),
    ):
        source = instantiate(compose_config("shards", [f"source={option}", "out_dir=o", *extra]).source)
        assert iter(source) is not None
    folder = instantiate(compose_config("shards", ["source=img2dataset", f"source.path={tmp_path}"]).source)
    assert folder.path == tmp_path


def test_data_options(latent_dir, raw_shards):
    latents = instantiate(compose_config("train", [f"data.train_dir={latent_dir}", "output_dir=o"]).data)
    assert latents.manifest.num_samples == 96
    images = instantiate(compose_config("train_autoencoder", [f"data.shards={raw_shards}", "output_dir=o"]).data)
    assert images.num_samples == 96


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match=r"optim\.learning_rate"):
        compose_config("train", ["optim.learning_rate=1e-4", "data.train_dir=x"])


@pytest.mark.parametrize("option", options("objective"))
def test_objective_options_train_a_step(option):
    import torch

    cfg = compose_config("train", [f"objective={option}", "data.train_dir=x", "output_dir=o"])
    module = instantiate(
        cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], uncond_text=None, caption_dropout=0.0
    )
    batch = {"latents": torch.randn(4, 4, 8, 8), "text": torch.randn(4, 77, 32)}
    loss = module.compute_loss(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert module.noise_scheduler.config.prediction_type == (cfg.objective.prediction_type or "epsilon")


@pytest.mark.parametrize("option", options("buckets"))
def test_bucket_options(option):
    from data_pipelines.transforms.buckets import BucketSet

    cfg = compose_config("precompute", ["shards=x", "out_dir=o", "pretrained=p", f"buckets={option}"])
    buckets = instantiate(cfg.buckets)
    assert isinstance(buckets, BucketSet) and len(buckets.sizes) >= 3


@pytest.mark.parametrize("option", options("features"))
def test_feature_options_build_or_name_the_local_file_they_need(option, tmp_path):
    from hydra.errors import InstantiationException

    cfg = compose_config("eval", ["model_dir=m", "out_dir=o", f"features={option}"])
    if option == "digits":
        assert instantiate(cfg.features).num_features == 45
        return
    path = tmp_path / "not-there"
    with pytest.raises(InstantiationException, match="not-there"):  # a DataError naming the path
        instantiate(cfg.features, **({"weights_path": path} if option == "inception" else {"folder": path}))
