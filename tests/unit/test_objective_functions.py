"""Each objective piece against a hand computation of its paper's formula."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.diffusion.loss_weights import DebiasedWeighting, MinSNRWeighting, UniformWeighting
from trainer.diffusion.noise import offset_noise
from trainer.diffusion.objective import Objective, fixed_timestep_loss
from trainer.diffusion.targets import training_target
from trainer.diffusion.timesteps import BiasedTimesteps, LogitNormalTimesteps, UniformTimesteps

TIMESTEPS = torch.tensor([0, 250, 500, 999])


def scheduler(**config):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", **config)


def snr_by_hand(s, timesteps):
    abar = s.alphas_cumprod[timesteps].double()
    return (abar / (1 - abar)).float()


def test_zero_terminal_snr_schedule_ends_in_pure_noise():
    rescaled = scheduler(rescale_betas_zero_snr=True)
    assert float(rescaled.alphas_cumprod[-1]) == 0.0  # Lin et al. 2024, Algorithm 1: SNR(T) = 0
    # ... and keeps the first step's sqrt(abar) (the algorithm shifts and scales sqrt(abar) between its ends).
    assert float(rescaled.alphas_cumprod[0]) == pytest.approx(float(scheduler().alphas_cumprod[0]), rel=1e-4)
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    last = torch.tensor([999])
    assert torch.allclose(rescaled.add_noise(x0, eps, last), eps)
    v = training_target(scheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction"), x0, eps, last)
    assert torch.allclose(v, -x0)  # v = sqrt(abar) eps - sqrt(1 - abar) x0 = -x0 at abar = 0


@pytest.mark.parametrize("zero_terminal", [False, True])
def test_min_snr_weights(zero_terminal):
    s = scheduler(rescale_betas_zero_snr=zero_terminal)
    snr = snr_by_hand(s, TIMESTEPS)
    weighting = MinSNRWeighting(gamma=5.0)
    for t, value in zip(TIMESTEPS.tolist(), snr.tolist(), strict=True):
        one = torch.tensor([value])
        expected_eps = 1.0 if value == 0 else min(value, 5.0) / value
        assert weighting(one, "epsilon").item() == pytest.approx(expected_eps, rel=1e-5), t
        assert weighting(one, "v_prediction").item() == pytest.approx(min(value, 5.0) / (value + 1), rel=1e-5), t
        assert weighting(one, "sample").item() == pytest.approx(min(value, 5.0), rel=1e-5), t
    assert torch.isfinite(weighting(snr, "epsilon")).all()


@pytest.mark.parametrize("zero_terminal", [False, True])
def test_debiased_weights(zero_terminal):
    snr = snr_by_hand(scheduler(rescale_betas_zero_snr=zero_terminal), TIMESTEPS)
    weighting = DebiasedWeighting()
    clamped = snr.clamp(1e-4, 1000.0)
    assert torch.allclose(weighting(snr, "epsilon"), 1 / clamped.sqrt())
    assert torch.allclose(weighting(snr, "v_prediction"), clamped.sqrt() / (clamped + 1))
    assert torch.isfinite(weighting(snr, "epsilon")).all()


@pytest.mark.parametrize("weighting", [MinSNRWeighting(5.0), DebiasedWeighting(), UniformWeighting()])
def test_weights_follow_the_loss_frame_conversion(weighting):
    """|eps - eps_hat|^2 = snr/(snr+1) |v - v_hat|^2 = snr |x0 - x0_hat|^2, so the weights convert alike."""
    if isinstance(weighting, UniformWeighting):
        assert torch.equal(weighting(torch.rand(5), "v_prediction"), torch.ones(5))
        return
    snr = torch.tensor([0.01, 0.5, 3.0, 20.0, 400.0])
    eps = weighting(snr, "epsilon")
    assert torch.allclose(weighting(snr, "v_prediction"), eps * snr / (snr + 1), rtol=1e-5)
    assert torch.allclose(weighting(snr, "sample"), eps * snr, rtol=1e-5)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        MinSNRWeighting()(torch.ones(1), "flow")


def test_offset_noise_adds_a_constant_per_sample_and_channel():
    torch.manual_seed(0)
    noise = torch.randn(3, 4, 5, 5)
    shifted = offset_noise(noise, 0.1)
    difference = shifted - noise
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    assert 0 < difference.abs().max() < 1.0
    assert offset_noise(noise, 0.0) is noise


def test_input_perturbation_keeps_the_target():
    """Ning et al. 2023: x_t uses eps + gamma xi, the target stays eps. With x_0 = 0 and a model
    predicting 0, the epsilon loss is E[eps^2] = 1; a target that included xi would give 1 + gamma^2."""
    torch.manual_seed(0)
    seen = {}

    def zero_model(noisy, timesteps, text):
        seen["input"] = noisy
        return torch.zeros_like(noisy)

    s = scheduler()
    objective = Objective(timesteps=BiasedTimesteps(999, 1000, multiplier=1e9), input_perturbation=1.0)
    latents = torch.zeros(4096, 1, 2, 2)
    terms = objective.loss(zero_model, s, latents, torch.zeros(4096, 1, 1))
    loss, timesteps = terms.loss, terms.timesteps
    assert (timesteps == 999).float().mean() > 0.99
    assert loss.item() == pytest.approx(1.0, abs=0.05)
    variance = (1 - s.alphas_cumprod[999]) * 2  # (1 - abar) (1 + gamma^2)
    assert seen["input"].var().item() == pytest.approx(float(variance), rel=0.05)


def test_uniform_objective_is_plain_mse():
    torch.manual_seed(0)
    s = scheduler()
    latents = torch.randn(8, 4, 2, 2)
    terms = Objective().loss(lambda x, t, c: torch.zeros_like(x), s, latents, torch.zeros(8, 1, 1))
    assert terms.timesteps.shape == (8,) and terms.errors.shape == (8,)
    assert terms.loss.item() == pytest.approx(terms.errors.mean().item())
    assert 0.5 < terms.loss.item() < 1.5  # E[eps^2] = 1


def test_fixed_timestep_loss_is_reproducible_and_unweighted():
    s = scheduler()
    latents, text = torch.randn(4, 4, 2, 2), torch.zeros(4, 1, 1)

    def model(x, t, c):
        return 0.5 * x

    first = fixed_timestep_loss(model, s, latents, text, [100, 900], seed=3)
    assert first.item() == fixed_timestep_loss(model, s, latents, text, [100, 900], seed=3).item()
    assert first.item() != fixed_timestep_loss(model, s, latents, text, [100, 900], seed=4).item()
    by_hand = []
    generator = torch.Generator().manual_seed(3)
    for step in (100, 900):
        noise = torch.randn(latents.shape, generator=generator)
        abar = s.alphas_cumprod[step]
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        by_hand.append(((0.5 * noisy - noise) ** 2).mean())
    assert first.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)


def test_timestep_samplers():
    torch.manual_seed(0)
    uniform = UniformTimesteps()(20000, 1000, torch.device("cpu"))
    assert uniform.min() >= 0 and uniform.max() <= 999 and abs(uniform.float().mean().item() - 499.5) < 10
    logit = LogitNormalTimesteps(mean=0.0, std=1.0)(20000, 1000, torch.device("cpu"))
    assert abs(logit.float().mean().item() - 500) < 10
    middle = ((logit > 250) & (logit < 750)).float().mean().item()
    assert middle == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.02)  # P(|n| < ln 3), n ~ N(0, 1)
    biased = BiasedTimesteps(begin=0, end=100, multiplier=3.0)(30000, 1000, torch.device("cpu"))
    share = (biased < 100).float().mean().item()
    assert share == pytest.approx(300 / 1200, abs=0.01)  # 100 steps x 3 out of 900 + 300
    excluded = BiasedTimesteps(begin=900, multiplier=0.0)(5000, 1000, torch.device("cpu"))
    assert excluded.max() < 900
    with pytest.raises(ValueError, match="not within"):
        BiasedTimesteps(begin=500, end=2000)(1, 1000, torch.device("cpu"))
