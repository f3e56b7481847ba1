import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.diffusion.targets import per_sample_mse, training_target


def alpha_bar(scheduler, t):
    return float(scheduler.alphas_cumprod[t])


@pytest.mark.parametrize("t", [0, 500, 999])
def test_v_target_matches_salimans_and_ho(t):
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    timesteps = torch.tensor([t, t])
    a = alpha_bar(scheduler, t)
    expected = math.sqrt(a) * eps - math.sqrt(1 - a) * x0  # v = alpha_t eps - sigma_t x0
    assert torch.allclose(training_target(scheduler, x0, eps, timesteps), expected, atol=1e-5)
    noisy = scheduler.add_noise(x0, eps, timesteps)
    assert torch.allclose(noisy, math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, atol=1e-5)


def test_epsilon_and_sample_targets():
    x0, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([1, 2])
    assert torch.equal(training_target(DDPMScheduler(prediction_type="epsilon"), x0, eps, t), eps)
    assert torch.equal(training_target(DDPMScheduler(prediction_type="sample"), x0, eps, t), x0)


def test_per_sample_mse_is_in_float32_per_sample():
    output, target = (
        torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16),
        torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)]),
    )
    errors = per_sample_mse(output, target)
    assert errors.dtype == torch.float32 and errors.tolist() == [1.0, 4.0]
