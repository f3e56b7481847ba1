"""Loss types, kohya's Huber schedules and multires noise against their closed forms on fixed tensors."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lf_common.errors import ConfigError
from trainer.diffusion.losses import elementwise_loss, huber_threshold, per_sample_loss, pseudo_huber
from trainer.diffusion.noise import multires_noise
from trainer.diffusion.objective import Objective, fixed_timestep_loss
from trainer.diffusion.timesteps import BiasedTimesteps

T = 1000


def scheduler(**config):
    return DDPMScheduler(num_train_timesteps=T, **config)


def test_pseudo_huber_is_half_mse_for_small_residuals_and_c_abs_for_large():
    c = 0.5
    small = torch.tensor([1e-3, -2e-3, 5e-4])
    assert torch.allclose(pseudo_huber(small, c), 0.5 * small**2, rtol=1e-3)
    large = torch.tensor([1e3, -2e3])
    assert torch.allclose(pseudo_huber(large, c), c * large.abs() - c**2, rtol=1e-6)
    assert torch.allclose(pseudo_huber(large, c) / (c * large.abs()), torch.ones(2), atol=1e-3)


def test_kohya_huber_and_smooth_l1_are_scaled_pseudo_huber():
    """kohya's conditional_loss: huber = 2 c (sqrt(r^2 + c^2) - c) -> r^2 (MSE) small, 2 c |r| large;
    smooth_l1 = 2 (sqrt(r^2 + c^2) - c) -> r^2 / c small, 2 |r| large."""
    c = torch.tensor([0.1, 0.4])  # one threshold per sample
    target = torch.zeros(2, 1, 1, 3)
    small = torch.tensor([1e-4, -3e-4, 2e-4]).expand(2, 1, 1, 3)
    huber = elementwise_loss(small, target, "huber", c)
    assert torch.allclose(huber, small**2, rtol=1e-3)
    assert torch.allclose(huber, elementwise_loss(small, target, "l2"), rtol=1e-3)
    smooth = elementwise_loss(small, target, "smooth_l1", c)
    assert torch.allclose(smooth, small**2 / c.view(2, 1, 1, 1), rtol=1e-3)
    large = torch.tensor([500.0, -800.0, 1200.0]).expand(2, 1, 1, 3)
    cc = c.view(2, 1, 1, 1)
    assert torch.allclose(elementwise_loss(large, target, "huber", c), 2 * cc * large.abs() - 2 * cc**2, rtol=1e-5)
    assert torch.allclose(elementwise_loss(large, target, "smooth_l1", c), 2 * large.abs() - 2 * cc, rtol=1e-5)
    r = torch.tensor([0.3]).view(1, 1, 1, 1)
    exact = 2 * 0.1 * (math.sqrt(0.3**2 + 0.1**2) - 0.1)
    assert elementwise_loss(r, torch.zeros_like(r), "huber", torch.tensor([0.1])).item() == pytest.approx(exact)


def test_l1_l2_and_pixel_weights_whatever_the_loss_type():
    output = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]]])
    target = torch.zeros_like(output)
    assert per_sample_loss(output, target, "l1").item() == pytest.approx((1 + 2 + 3 + 0.5) / 4)
    assert per_sample_loss(output, target, "l2").item() == pytest.approx((1 + 4 + 9 + 0.25) / 4)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    for loss_type in ("l2", "l1", "huber", "smooth_l1"):
        c = torch.tensor([0.2])
        full = elementwise_loss(output, target, loss_type, c)
        weighted = per_sample_loss(output, target, loss_type, c, pixel_weights=mask)
        assert weighted.item() == pytest.approx(float((full * mask).mean())), loss_type


def test_masked_huber_gradient_is_zero_where_the_mask_is_zero():
    output = torch.randn(2, 4, 3, 3, requires_grad=True)
    mask = (torch.rand(2, 1, 3, 3) > 0.5).float()
    per_sample_loss(output, torch.zeros_like(output), "huber", torch.tensor([0.1, 0.2]), mask).sum().backward()
    assert (output.grad * (1 - mask)).abs().max() == 0
    assert output.grad.abs().max() > 0


@pytest.mark.parametrize("t", [0, 137, 500, 999])
def test_huber_schedules_follow_kohya_formulas(t):
    s = scheduler()
    timesteps = torch.tensor([t])
    c, scale = 0.1, 1.5
    constant = huber_threshold("constant", c, scale, timesteps, s.alphas_cumprod, T)
    assert constant.item() == pytest.approx(c * scale)
    exponential = huber_threshold("exponential", c, scale, timesteps, s.alphas_cumprod, T)
    assert exponential.item() == pytest.approx(scale * math.exp(math.log(c) / T * t), rel=1e-6)
    assert exponential.item() == pytest.approx(scale * c ** (t / T), rel=1e-6)
    abar = float(s.alphas_cumprod[t])
    sigma = math.sqrt((1 - abar) / abar)
    snr = huber_threshold("snr", c, scale, timesteps, s.alphas_cumprod, T)
    assert snr.item() == pytest.approx((1 - c) / (1 + sigma) ** 2 + c, rel=1e-5)


def test_snr_schedule_is_finite_on_a_zero_terminal_snr_schedule():
    s = scheduler(rescale_betas_zero_snr=True)
    c = huber_threshold("snr", 0.1, 1.0, torch.tensor([0, 999]), s.alphas_cumprod, T)
    assert torch.isfinite(c).all() and c[1].item() == pytest.approx(0.1)
    assert c[0].item() > 0.9  # near MSE at the first step


def test_multires_noise_at_zero_iterations_is_the_input():
    noise = torch.randn(2, 4, 8, 8)
    assert multires_noise(noise, 0, 0.3) is noise


def test_multires_noise_levels_follow_the_formula():
    noise = torch.randn(2, 3, 16, 12)
    made = multires_noise(noise, 3, 0.5, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    expected = noise.clone()
    for level in range(3):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        size = (max(1, int(16 / r**level)), max(1, int(12 / r**level)))
        coarse = torch.randn((2, 3, *size), generator=generator)
        if level == 0:
            assert size == (16, 12)  # r**0 = 1: the first level is white noise at full size
        expected += torch.nn.functional.interpolate(coarse, size=(16, 12), mode="bilinear") * 0.5**level
    expected /= expected.std()
    assert torch.allclose(made, expected, atol=1e-6)
    assert made.std().item() == pytest.approx(1.0, abs=1e-5)


def test_multires_noise_has_more_low_frequency_power():
    torch.manual_seed(0)
    noise = torch.randn(64, 4, 32, 32)
    pyramid = multires_noise(noise, 6, 0.8)
    # The per-channel spatial mean of white noise has std 1/32; the coarse levels raise it well above.
    assert noise.mean(dim=(2, 3)).std() < 0.05
    assert pyramid.mean(dim=(2, 3)).std() > 0.1


@pytest.mark.parametrize("multires", [0, 4])
def test_objective_huber_loss_matches_its_parts(multires):
    """The objective's errors are kohya's per-sample Huber loss at the SNR threshold of each timestep, against
    the noise the model saw (multires noise included: it is both the input's noise and the target)."""
    torch.manual_seed(0)
    s = scheduler()
    seen = {}

    def model(noisy, timesteps, text):
        seen["noisy"] = noisy
        return torch.full_like(noisy, 0.3)

    objective = Objective(
        loss_type="huber", timesteps=BiasedTimesteps(400, 401, multiplier=1e9), multires_noise_iterations=multires
    )
    latents = torch.zeros(6, 4, 8, 8)  # x_0 = 0: x_t = sqrt(1 - abar) eps, so the noise is recoverable
    terms = objective.loss(model, s, latents, torch.zeros(6, 1, 1))
    assert (terms.timesteps == 400).all()
    eps = seen["noisy"] / math.sqrt(1 - float(s.alphas_cumprod[400]))
    c = (1 - 0.1) / (1 + math.sqrt((1 - float(s.alphas_cumprod[400])) / float(s.alphas_cumprod[400]))) ** 2 + 0.1
    expected = (2 * c * (torch.sqrt((0.3 - eps) ** 2 + c**2) - c)).mean(dim=(1, 2, 3))
    assert torch.allclose(terms.errors, expected, rtol=1e-4)
    assert terms.loss.item() == pytest.approx(expected.mean().item(), rel=1e-4)


def test_validation_loss_stays_mse_whatever_the_loss_type():
    s = scheduler()
    latents, text = torch.randn(2, 4, 4, 4), torch.zeros(2, 1, 1)

    def model(noisy, timesteps, text):
        return torch.zeros_like(noisy)

    mse = fixed_timestep_loss(model, s, latents, text, [100, 900], seed=3)
    generator = torch.Generator().manual_seed(3)
    by_hand = torch.stack([torch.randn(latents.shape, generator=generator).pow(2).mean() for _ in (100, 900)]).mean()
    assert mse.item() == pytest.approx(by_hand.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("loss_type", "l3", "model.objective.loss_type='l3'"),
        ("huber_schedule", "cosine", "model.objective.huber_schedule='cosine'"),
        ("huber_c", 0.0, "model.objective.huber_c=0.0"),
        ("huber_scale", -1.0, "model.objective.huber_scale=-1.0"),
    ],
)
def test_bad_loss_settings_are_refused_by_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Objective(**{key: value})
