import lightning as L
import pytest

from tests.unit.tiny_lightning import TinyLinear, bare_trainer
from trainer.callbacks.ema import EMA, ema_decay


def test_decay_warmup_formula():
    assert ema_decay(0, 0.999, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay(90, 0.999, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999, warmup=True) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999


def test_update_moves_average_towards_current():
    import torch

    callback = EMA(decay=0.9, warmup=False)
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    callback._update(averaged, current, torch.tensor(5))
    assert torch.allclose(averaged[0], torch.full((3,), 0.1))


def test_rejects_bad_decay():
    with pytest.raises(ValueError, match="expected 0 < decay < 1"):
        EMA(decay=1.0)


class Recorder(L.Callback):
    """Records the raw parameters after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append([p.detach().clone().double() for p in pl_module.parameters()])


def test_ema_equals_a_reference_computed_by_hand():
    """The callback's average after 6 steps of a real fit equals the warm-up EMA recomputed from the raw weights."""
    import torch

    torch.manual_seed(0)
    ema, recorder = EMA(decay=0.9, warmup=True), Recorder()
    trainer = bare_trainer(max_steps=6, enable_progress_bar=False, callbacks=[ema, recorder])
    trainer.fit(TinyLinear(lr=0.5), torch.utils.data.DataLoader(torch.randn(12, 3), batch_size=2))
    reference = recorder.steps[0]  # the first update copies the weights
    for n, params in enumerate(recorder.steps[1:], start=1):
        decay = min(0.9, (1 + n) / (10 + n))
        reference = [decay * r + (1 - decay) * p for r, p in zip(reference, params, strict=True)]
    averaged = [p.double() for p in ema.averaged_module().parameters()]
    assert len(recorder.steps) == 6
    assert not torch.allclose(averaged[0], recorder.steps[-1][0]), "the average lags the raw weights"
    for got, want in zip(averaged, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
