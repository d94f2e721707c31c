"""IDDPM learned-range loss and DPM-Solver++ sampling, checked by hand and against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

from training.convert import export_diffusers
from training.diffusion import GaussianDiffusion, sample
from training.model import PRESETS, PixArtSigma

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion()


def _numpy_schedule():
    """The IDDPM tables, written out independently in numpy (float64)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return betas, abar, post_var


def _tiny_model(seed: int = 0) -> PixArtSigma:
    torch.manual_seed(seed)
    model = PixArtSigma(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_schedule_matches_ddpm_and_the_sampler(diffusion):
    betas, abar, post_var = _numpy_schedule()
    np.testing.assert_allclose(diffusion.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(
        diffusion.posterior_log_variance_clipped[1:].numpy(), np.log(post_var[1:]), rtol=1e-12
    )
    assert (
        diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]
    )  # clipped
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    np.testing.assert_allclose(ddpm.alphas_cumprod.numpy(), abar, rtol=1e-5)
    np.testing.assert_allclose(diffusion.scheduler().alphas_cumprod.numpy(), abar, rtol=1e-5)
    assert diffusion.scheduler().config.prediction_type == "epsilon"
    assert diffusion.scheduler().config.algorithm_type == "dpmsolver++"


def test_q_sample_matches_diffusers_add_noise(diffusion):
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 417, 999])
    torch.testing.assert_close(
        diffusion.q_sample(x0, t, noise), ddpm.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5
    )


def test_learned_range_endpoints(diffusion):
    betas, _, post_var = _numpy_schedule()
    t = torch.tensor([0, 10, 999])
    x_t, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    _, low = diffusion.p_mean_log_variance(eps, -torch.ones_like(eps), x_t, t)
    _, high = diffusion.p_mean_log_variance(eps, torch.ones_like(eps), x_t, t)
    _, mid = diffusion.p_mean_log_variance(eps, torch.zeros_like(eps), x_t, t)
    expect_low = np.log([post_var[1], post_var[10], post_var[999]])  # β̃, with β̃_1 standing in at t = 0
    expect_high = np.log([betas[0], betas[10], betas[999]])
    np.testing.assert_allclose(low[:, 0, 0, 0].numpy(), expect_low, rtol=1e-6)
    np.testing.assert_allclose(high[:, 0, 0, 0].numpy(), expect_high, rtol=1e-6)
    np.testing.assert_allclose(mid[:, 0, 0, 0].numpy(), (expect_low + expect_high) / 2, rtol=1e-6)


def test_perfect_prediction_has_zero_loss(diffusion):
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([5, 600])
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # exact ε, variance = posterior β̃_t
    losses = diffusion.training_losses(out, x0, t, noise)
    assert losses["mse"].shape == losses["vb"].shape == losses["loss"].shape == (2,)
    torch.testing.assert_close(losses["mse"], torch.zeros(2))
    torch.testing.assert_close(losses["vb"], torch.zeros(2), atol=1e-4, rtol=0)


def test_vb_is_the_gaussian_kl_in_bits(diffusion):
    betas, _, post_var = _numpy_schedule()
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t = torch.tensor([3])  # early t: β̃_t and β_t differ by ~25 %, so the KL is not lost to float32 rounding
    out = torch.cat([noise, torch.ones_like(noise)], dim=1)  # exact mean, variance β_t instead of β̃_t
    vb = diffusion.training_losses(out, x0, t, noise)["vb"].item()
    # KL(N(μ, β̃) ‖ N(μ, β)) = ½(log β − log β̃ + β̃/β − 1), per dim, in bits
    b, pv = betas[3], post_var[3]
    expected = 0.5 * (math.log(b) - math.log(pv) + pv / b - 1) / math.log(2)
    assert vb == pytest.approx(expected, rel=1e-3)
    # and the mean error enters as (Δμ)²/(2σ²): shift ε by δ everywhere (early t, where Δμ is not tiny)
    t, delta = torch.tensor([10]), 0.5
    out = torch.cat([noise + delta, -torch.ones_like(noise)], dim=1)
    vb = diffusion.training_losses(out, x0, t, noise)["vb"].item()
    abar = np.cumprod(1 - betas)
    # μ = c2·x_t + c1·x̂0 with x̂0 = (x_t − √(1−ᾱ)ε)/√ᾱ, so Δμ = −c1·√(1/ᾱ − 1)·δ
    c1 = betas[10] * math.sqrt(abar[9]) / (1 - abar[10])
    d_mu = c1 * math.sqrt(1 / abar[10] - 1) * delta
    assert vb == pytest.approx(d_mu**2 / (2 * post_var[10]) / math.log(2), rel=1e-3)


def test_t0_uses_the_discretized_decoder_nll(diffusion):
    _, _, post_var = _numpy_schedule()
    x0, noise = torch.zeros(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # at t = 0 the mean is x̂0 = x0 exactly
    vb = diffusion.training_losses(out, x0, torch.tensor([0]), noise)["vb"].item()
    sigma = math.sqrt(post_var[1])
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = -math.log(cdf(1 / 255 / sigma) - cdf(-1 / 255 / sigma)) / math.log(2)
    assert vb == pytest.approx(expected, rel=1e-4)


def test_vb_trains_only_the_variance_and_mse_only_eps(diffusion):
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([3, 700])
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    losses = diffusion.training_losses(out, x0, t, noise)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert torch.count_nonzero(g_vb[:, :4]) == 0 and torch.count_nonzero(g_vb[:, 4:]) > 0
    assert torch.count_nonzero(g_mse[:, 4:]) == 0 and torch.count_nonzero(g_mse[:, :4]) > 0
    with pytest.raises(ValueError, match="learned sigma"):
        diffusion.training_losses(out[:, :4], x0, t, noise)


def test_sample_runs_20_guided_steps(monkeypatch):
    model = _tiny_model()
    calls = []
    original = PixArtSigma.forward

    def spy(self, x, timestep, y, mask=None, **kwargs):
        calls.append((x.shape[0], kwargs.get("force_drop_ids")))
        return original(self, x, timestep, y, mask, **kwargs)

    monkeypatch.setattr(PixArtSigma, "forward", spy)
    y, mask = torch.randn(2, 5, TINY.caption_channels), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    a = sample(model, y, mask, latent_size=(8, 6), generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 4, 8, 6) and torch.isfinite(a).all()
    assert len(calls) == 20
    assert all(batch == 4 and drop.tolist() == [False, False, True, True] for batch, drop in calls)
    b = sample(model, y, mask, latent_size=(8, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    calls.clear()
    sample(model, y, mask, latent_size=(8, 6), num_steps=5, cfg_scale=1.0)
    assert [batch for batch, _ in calls] == [2] * 5  # no guidance: one pass per step


def test_sample_matches_pixart_sigma_pipeline(tmp_path, diffusion):
    """Same weights, captions, null caption, start noise and scheduler → the same latents as diffusers."""
    model = _tiny_model(seed=3)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 6, TINY.caption_channels, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    null, null_mask = (
        torch.randn(1, 6, TINY.caption_channels, generator=gen),
        torch.tensor([[1, 0, 0, 0, 0, 0]]),
    )
    model.set_null_caption(null[0], null_mask[0])
    start = torch.randn(1, 4, 8, 10, generator=gen)

    ours = sample(model, y, mask, latent_size=(8, 10), latents=start.clone(), diffusion=diffusion)

    export_diffusers(model, tmp_path / "transformer")
    pipe = PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer"),
        scheduler=diffusion.scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=y,
        prompt_attention_mask=mask,
        negative_prompt_embeds=null,
        negative_prompt_attention_mask=null_mask,
        latents=start.clone(),
        height=8 * 8,  # no VAE: the pipeline assumes /8
        width=10 * 8,
        num_inference_steps=20,
        guidance_scale=4.5,
        use_resolution_binning=False,
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (1, 4, 8, 10)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, start)  # it did denoise
