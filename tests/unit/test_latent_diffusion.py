import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from trainer.cli.hydra_app import optimizer_factories


def build_module(caption_dropout=0.0, uncond=None, lr=1e-3, warmup=True):
    cfg = compose_config("train", ["data.train_dir=unused", f"optim.lr={lr}", "output_dir=unused"])
    return instantiate(
        cfg.model,
        optimizer=optimizer_factories(cfg)["optimizer"],
        lr_scheduler=instantiate(cfg.lr_scheduler) if warmup else None,
        caption_dropout=caption_dropout,
        uncond_text=uncond,
    )


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    module = build_module(warmup=False)
    optimizer = module.configure_optimizers()
    batch = {"latents": torch.randn(8, 4, 8, 8).half(), "text": torch.randn(8, 8, 32).half()}

    def loss_at_fixed_noise():
        torch.manual_seed(123)
        return module.compute_loss(batch).loss.item()

    before = loss_at_fixed_noise()
    for _ in range(40):
        optimizer.zero_grad()
        module.compute_loss(batch).loss.backward()
        optimizer.step()
    assert loss_at_fixed_noise() < 0.7 * before


def test_caption_dropout_uses_the_unconditional_embedding():
    uncond = torch.full((8, 32), 7.0)
    text = torch.zeros(4, 8, 32)
    assert torch.equal(build_module(1.0, uncond).drop_captions(text), uncond.expand(4, -1, -1))
    assert torch.equal(build_module(0.0, uncond).drop_captions(text), text)
    torch.manual_seed(0)
    dropped = build_module(0.5, uncond).drop_captions(torch.zeros(1000, 8, 32))
    assert 400 < int((dropped[:, 0, 0] == 7.0).sum()) < 600


def test_module_holds_only_the_unet():
    module = build_module()
    names = {name.split(".")[0] for name, _ in module.named_parameters()}
    assert names == {"unet"}
    assert 600_000 < sum(p.numel() for p in module.parameters()) < 800_000


def test_optimizer_and_per_step_schedule_from_config():
    configured = build_module(lr=3e-4).configure_optimizers()
    assert configured["lr_scheduler"]["interval"] == "step"
    optimizer = configured["optimizer"]
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.param_groups[0]["lr"] == 0.0  # warm-up starts at 0


def test_configured_lists_reach_the_module_as_plain_lists():
    cfg = compose_config(
        "train", ["data.train_dir=unused", "output_dir=unused", "model.validation_timesteps=[100,900]"]
    )
    module = instantiate(
        cfg.model, optimizer=optimizer_factories(cfg)["optimizer"], uncond_text=None, caption_dropout=0.0
    )
    assert module.validation_timesteps == [100, 900]
    assert type(module.hparams["validation_timesteps"]) is list  # checkpoints load with weights_only=True
