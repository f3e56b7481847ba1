"""The EMA callback: the warm-up decay, the average of a real fit against the closed form, a LoRA run's average
holding its adapters only, and its checkpoint state (this layout, the earlier full-module one, a foreign one)."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from lf_common.errors import DataError
from tests.unit.tiny_lightning import TinyLinear, bare_trainer
from trainer.callbacks.ema import EMA, ema_decay, update_average
from trainer.checkpoint.keys import EMA_STATE_KEY, RAW_STATE_KEY
from trainer.checkpoint.reading import ema_model_state
from trainer.cli.hydra_app import compose_config, optimizer_factories


def test_decay_warmup_formula():
    assert ema_decay(0, 0.999, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay(90, 0.999, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999, warmup=True) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_update_moves_average_towards_current_in_the_average_dtype():
    averaged, current = [torch.zeros(3)], [torch.ones(3, dtype=torch.bfloat16)]
    update_average(averaged, current, 0.1)
    assert averaged[0].dtype == torch.float32
    assert torch.allclose(averaged[0], torch.full((3,), 0.1))


def test_rejects_bad_decay():
    with pytest.raises(ValueError, match="expected 0 < decay < 1"):
        EMA(decay=1.0)


class Recorder(L.Callback):
    """Records the trained parameters after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append([p.detach().clone().double() for p in pl_module.parameters() if p.requires_grad])


def closed_form(steps: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """The warm-up EMA of a trajectory, recomputed from the raw weights (the first update copies them)."""
    reference = steps[0]
    for n, params in enumerate(steps[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        reference = [d * r + (1 - d) * p for r, p in zip(reference, params, strict=True)]
    return reference


@pytest.mark.parametrize("device", [None, "cpu"])
def test_ema_equals_a_reference_computed_by_hand(device):
    """The callback's average after 6 steps of a real fit equals the warm-up EMA recomputed from the raw weights."""
    torch.manual_seed(0)
    ema, recorder = EMA(decay=0.9, warmup=True, device=device), Recorder()
    trainer = bare_trainer(max_steps=6, enable_progress_bar=False, callbacks=[ema, recorder])
    trainer.fit(TinyLinear(lr=0.5), torch.utils.data.DataLoader(torch.randn(12, 3), batch_size=2))
    averaged = [a.double() for a in ema.average]
    assert {a.device.type for a in ema.average} == {"cpu"}
    assert len(recorder.steps) == 6 and ema.names == ["layer.weight", "layer.bias"]
    assert not torch.allclose(averaged[0], recorder.steps[-1][0]), "the average lags the raw weights"
    for got, want in zip(averaged, closed_form(recorder.steps, 0.9), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


class ValidatedLinear(TinyLinear):
    """Records, in each validation step, its weight and the EMA's average of it."""

    def __init__(self, ema: EMA) -> None:
        super().__init__(lr=0.5)
        self.ema, self.seen = ema, []

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.seen.append((self.layer.weight.detach().clone(), self.ema.average[0].clone()))


def test_validation_runs_on_the_average_and_the_raw_weights_come_back():
    torch.manual_seed(0)
    ema, recorder = EMA(decay=0.9), Recorder()
    module = ValidatedLinear(ema)
    trainer = bare_trainer(
        max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
        callbacks=[ema, recorder],
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randn(12, 3), batch_size=2)
    trainer.fit(module, data, data)
    assert len(module.seen) == 2 and all(torch.equal(weight, average) for weight, average in module.seen)
    raw = module.layer.weight.detach().clone()
    assert torch.equal(raw.double(), recorder.steps[-1][0]) and not torch.equal(raw, ema.average[0])
    with ema.average_weights():  # what validation images sample with
        assert torch.equal(module.layer.weight, ema.average[0])
    assert torch.equal(module.layer.weight, raw)


def latents(count: int) -> list[dict[str, torch.Tensor]]:
    """Random latent samples for the tiny UNet (4 x 8 x 8 latents, 77 x 32 text)."""
    generator = torch.Generator().manual_seed(0)
    return [
        {"latents": torch.randn(4, 8, 8, generator=generator), "text": torch.randn(77, 32, generator=generator)}
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def lora_fit():
    """The tiny UNet with LoRA adapters after 4 optimizer steps with the EMA on: ``(module, ema, recorder)``."""
    torch.manual_seed(0)
    cfg = compose_config("train", ["experiment=lora", "callbacks.ema=null", "model.caption_dropout=0", "optim.lr=0.05"])
    module = instantiate(cfg.model, **optimizer_factories(cfg, param_groups=True))
    ema, recorder = EMA(decay=0.9, warmup=True), Recorder()
    trainer = bare_trainer(max_steps=4, enable_progress_bar=False, callbacks=[ema, recorder])
    trainer.fit(module, torch.utils.data.DataLoader(latents(8), batch_size=2))
    return module, ema, recorder


def test_a_lora_run_averages_its_adapters_only_and_equals_the_closed_form(lora_fit):
    module, ema, recorder = lora_fit
    adapters = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_" in n for n in adapters)
    assert ema.names == list(adapters), "the adapters, by state_dict name, and nothing else"
    ema_bytes = sum(a.numel() * a.element_size() for a in ema.average)
    assert ema_bytes == 4 * sum(p.numel() for p in adapters.values())
    assert ema_bytes * 20 < sum(p.numel() * 4 for p in module.parameters()), "far below a copy of the module"
    assert {a.dtype for a in ema.average} == {torch.float32}
    for got, want in zip(ema.average, closed_form(recorder.steps, 0.9), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(ema.average, adapters.values(), strict=True)), "it lags"


def fresh_ema(module: L.LightningModule) -> EMA:
    """An EMA callback set up on ``module`` as a resumed fit sets it up (no step taken)."""
    callback = EMA(decay=0.9)
    trainer = bare_trainer(max_steps=1)
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    return callback


def test_the_checkpoint_holds_the_adapters_average_and_resumes_it(lora_fit):
    module, ema, _ = lora_fit
    checkpoint = {"state_dict": module.state_dict(), "callbacks": {ema.state_key: ema.state_dict()}}
    ema.on_save_checkpoint(None, module, checkpoint)
    assert list(checkpoint[EMA_STATE_KEY]) == ema.names and checkpoint["averaging_state"]["n_averaged"] == 4
    model = ema_model_state(checkpoint["state_dict"], checkpoint[EMA_STATE_KEY])  # what export loads
    assert list(model) == list(checkpoint["state_dict"])
    assert all(torch.equal(model[n], a) for n, a in zip(ema.names, ema.average, strict=True))
    frozen = [k for k in model if k not in checkpoint[EMA_STATE_KEY]]
    assert frozen and all(torch.equal(model[k], checkpoint["state_dict"][k]) for k in frozen)

    resumed = fresh_ema(module)
    resumed.load_state_dict(checkpoint["callbacks"][ema.state_key])
    resumed.on_load_checkpoint(None, module, checkpoint)
    assert resumed.num_averaged == 4 and resumed.state_dict() == ema.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(resumed.average, ema.average, strict=True))


def test_a_checkpoint_of_the_full_module_ema_resumes_with_its_trained_part(lora_fit):
    module = lora_fit[0]
    full = {k: v.float() + 1 for k, v in module.state_dict().items()}  # the earlier callback averaged everything
    old = {"state_dict": module.state_dict(), EMA_STATE_KEY: full, "averaging_state": {"n_averaged": torch.tensor(7)}}
    resumed = fresh_ema(module)
    resumed.on_load_checkpoint(None, module, old)
    assert resumed.num_averaged == 7
    assert all(torch.equal(a, full[n]) for n, a in zip(resumed.names, resumed.average, strict=True))
    assert ema_model_state(old["state_dict"], full) == full, "export: the old average of every weight"

    lightning_layout = {"state_dict": full, RAW_STATE_KEY: module.state_dict(), "averaging_state": {}}
    raw = [p.detach().clone() for p in module.parameters()]
    resumed = fresh_ema(module)
    resumed.on_load_checkpoint(None, module, lightning_layout)  # the raw weights go back into the module
    assert all(torch.equal(a, full[n]) for n, a in zip(resumed.names, resumed.average, strict=True))
    assert all(torch.equal(p, r) for p, r in zip(module.parameters(), raw, strict=True))


def test_a_checkpoint_without_the_trained_parameters_average_is_refused_in_one_line(lora_fit):
    module = lora_fit[0]
    foreign = {k: v for k, v in module.state_dict().items() if ".lora_" not in k}  # e.g. a full fine-tune's
    resumed = fresh_ema(module)
    trainer = bare_trainer(max_steps=1)
    with pytest.raises(DataError, match=r"key 'ema_state_dict' has no average of 'unet\..*lora_A.*callbacks.ema=null"):
        resumed.on_load_checkpoint(trainer, module, {"state_dict": foreign, EMA_STATE_KEY: foreign})


EMA_ON = "callbacks.ema={_target_:trainer.callbacks.ema.EMA,decay:0.999}"  # as docs/lora.md says


@pytest.mark.parametrize(
    "experiment", ["dreambooth_lora", "dreambooth_lora_sdxl", "pivotal_lora", "textual_inversion_sdxl"]
)
def test_recipes_without_ema_take_it_back_from_the_command_line(experiment):
    """The adapter and embedding recipes turn the EMA off; the documented override turns it on again
    (``callbacks=default`` would not: the recipe's ``ema: null`` is merged after the group)."""
    off = compose_config("train", [f"experiment={experiment}", "callbacks=default"])
    assert off.callbacks.ema is None
    on = compose_config("train", [f"experiment={experiment}", EMA_ON])
    callback = instantiate(on.callbacks.ema)
    assert isinstance(callback, EMA) and callback.decay == 0.999
