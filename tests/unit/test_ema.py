import pytest

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
