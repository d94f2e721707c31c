"""IDDPM with learned-range variance (the PixArt/DiT training objective) and DPM-Solver++ sampling.

Training follows Nichol & Dhariwal, "Improved DDPM" (arXiv 2102.09672), as PixArt's and DiT's
``diffusion/gaussian_diffusion.py`` configure it: 1000 linear betas 1e-4 → 0.02, ε-prediction, model
variance interpolated in log space between the clipped posterior variance β̃_t and β_t, loss = MSE on ε +
the variational-bound term computed with the predicted mean detached (only the variance output learns
from it; loss type "MSE", so the VB term is not rescaled). Sampling is diffusers' DPM-Solver++.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from training.model import PixArtSigma

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
SAMPLE_STEPS = 20
CFG_SCALE = 4.5


class GaussianDiffusion:
    """Noise schedule tables (float64, like the reference's numpy ones) and the IDDPM hybrid loss."""

    def __init__(
        self,
        num_timesteps: int = NUM_TIMESTEPS,
        *,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
    ) -> None:
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0): β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t). β̃_0 = 0, so its log is
        # "clipped" by reusing β̃_1 at t = 0 (IDDPM).
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        )

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        return (
            _at(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _at(self.posterior_mean_coef1, t, x_t) * x_start + _at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _at(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_log_variance(
        self, eps: Tensor, var_values: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Model mean (from ε, unclipped x_0) and learned-range log-variance of p(x_{t-1} | x_t)."""
        # v ∈ [-1, 1] picks a point between log β̃_t (v = -1) and log β_t (v = 1), in log space.
        min_log = _at(self.posterior_log_variance_clipped, t, x_t)
        max_log = _at(torch.log(self.betas), t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (
            _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_variance

    def training_losses(
        self, model_output: Tensor, x_start: Tensor, t: Tensor, noise: Tensor
    ) -> dict[str, Tensor]:
        """Per-sample {loss, mse, vb} for model_output (B, 2C, H, W) on x_t = q_sample(x_start, t, noise)."""
        C = x_start.shape[1]
        if model_output.shape != (x_start.shape[0], 2 * C, *x_start.shape[2:]):
            raise ValueError(
                f"model_output must be (B, 2·{C}, H, W) (learned sigma), got {tuple(model_output.shape)}"
            )
        eps, var_values = model_output.float().split(C, dim=1)  # (B, C, H, W) each
        x_start, noise = x_start.float(), noise.float()
        x_t = self.q_sample(x_start, t, noise)
        # VB term with the mean detached: it trains only the variance output (IDDPM §3.1, "frozen_out").
        vb = self._vb_bits(eps.detach(), var_values, x_start, x_t, t)  # (B,)
        mse = (noise - eps).pow(2).mean(dim=(1, 2, 3))  # (B,)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_bits(self, eps: Tensor, var_values: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) in bits per dim; the decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var = self.p_mean_log_variance(eps, var_values, x_t, t)
        kl = _normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)  # (B,)
        nll = -_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)  # (B, C, H, W)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)  # (B,)
        return torch.where(t == 0, nll, kl)

    def scheduler(self) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ (2nd order, multistep) on this noise schedule, ε-prediction."""
        # Imported here: training needs only the loss, and a GPU box without diffusers can still train.
        from diffusers import DPMSolverMultistepScheduler

        # variance_type stays None: diffusers' learned-range branch keeps `[:, :3]`, an RGB leftover that
        # would drop a latent channel. The ε channels are split off before the scheduler sees them.
        return DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule="linear",
            prediction_type="epsilon",
            algorithm_type="dpmsolver++",
            solver_order=2,
        )


@torch.no_grad()
def sample(
    model: PixArtSigma,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    latent_size: tuple[int, int],
    num_steps: int = SAMPLE_STEPS,
    cfg_scale: float = CFG_SCALE,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    diffusion: GaussianDiffusion | None = None,
) -> Tensor:
    """Latents (B, C, h, w) for captions y (B, L, C_cap): DPM-Solver++, CFG against the model's null caption."""
    diffusion = diffusion or GaussianDiffusion()
    scheduler = diffusion.scheduler()
    scheduler.set_timesteps(num_steps, device=y.device)
    B, C = y.shape[0], model.config.in_channels
    dtype = next(model.parameters()).dtype
    if latents is None:
        shape = (B, C, *latent_size)
        latents = torch.randn(shape, generator=generator, device=y.device, dtype=torch.float32)
    latents = latents.float() * scheduler.init_noise_sigma  # (B, C, h, w)
    y = y.to(dtype)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t).to(dtype)  # (B, C, h, w)
        timestep = t.expand(B).to(y.device)  # (B,)
        if cfg_scale == 1.0:
            out = model(model_input, timestep, y, mask)  # (B, C_out, h, w)
        else:
            out = model.forward_with_cfg(model_input, timestep, y, mask, cfg_scale=cfg_scale)
        eps = out[:, :C].float()  # (B, C, h, w): the variance channels are not used by an ODE solver
        latents = scheduler.step(eps, t, latents).prev_sample  # (B, C, h, w)
    return latents


def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] as float32 on like's device, shaped (B, 1, 1, …) to broadcast."""
    values = table.to(t.device)[t].to(torch.float32)  # (B,)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) for data on 256 bins in [-1, 1] (IDDPM's decoder; exact normal CDF, 1e-12 floors)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The two edge bins extend to ∓∞.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
