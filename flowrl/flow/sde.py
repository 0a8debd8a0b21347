"""One denoising step of a flow-matching sampler as a Gaussian policy step with an exact log-probability.

Conventions (diffusers flow matching, SD3 / FLUX): ``x_σ = (1-σ)·x0 + σ·ε``, σ = 1 is noise, σ = 0 is data; the model
predicts the velocity ``v ≈ ε - x0``; a step goes from σ to σ_next < σ, ``Δ = σ_next - σ < 0``. Every function here is
pure: tensors in, a :class:`StepOutput` out, computed in float32 whatever the input dtype.

Shapes: ``x``, ``v`` are ``[B, ...]`` (latents, e.g. ``[B, C, H, W]``); ``sigma``, ``sigma_next``, ``noise_level`` are
Python floats or tensors broadcastable to ``[B]`` (one value per sample, so samples of one batch may sit at different
steps or be stochastic/deterministic independently).

Log-probability convention: the Gaussian log-density of ``x'`` under ``N(μ, s²·I)``, all terms kept
(``-(x'-μ)²/(2s²) - log s - ½·log 2π``), **averaged** over the non-batch dimensions — the convention of the
Flow-GRPO reference implementation (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``). Multiply by the number of
dimensions for the joint density. ``x'`` enters detached: gradients reach the log-probability only through μ.
Deterministic steps (noise level 0, or CPS's final step to σ_next = 0) have no density; their ``log_prob`` is 0 and
``std`` is 0 — such steps must not be trained (the rollout marks them untrained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """Result of one sampler step.

    Attributes:
        prev_sample: ``x'`` ``[B, ...]`` float32, the next (less noisy) sample.
        mean: ``μ`` ``[B, ...]`` float32, the mean of the Gaussian transition (carries gradients of ``v``).
        std: ``[B]`` float32, the standard deviation ``s`` of the transition per sample (0 for deterministic steps).
        log_prob: ``[B]`` float32, log-density of ``prev_sample`` averaged over dimensions (0 where ``std == 0``).
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def _per_sample(value, batch: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(batch)
    t = t.reshape(-1).float()
    if t.shape[0] != batch:
        raise ValueError(f"expected a scalar or {batch} per-sample values, got shape {tuple(t.shape)}")
    return t


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std²·I)`` averaged over non-batch dimensions.

    Args:
        x: ``[B, ...]`` sample (detached by the caller if it must not carry gradients).
        mean: ``[B, ...]`` Gaussian mean.
        std: ``[B]`` standard deviation per sample; entries ``<= 0`` give log-prob 0 (no density).

    Returns:
        ``[B]`` float32: ``mean_dims(-(x-μ)²/(2·std²) - log std - ½·log 2π)``.
    """
    s = _bcast(std, x)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - LOG_SQRT_2PI
    lp = lp.mean(dim=tuple(range(1, x.ndim)))
    return torch.where(std.to(lp.device) > 0, lp, torch.zeros_like(lp))


def flow_grpo_std(sigma, noise_level, sigma_max: float | None = None) -> torch.Tensor:
    """Diffusion coefficient ``std_t = a·sqrt(σ/(1-σ))`` of the Flow-GRPO SDE (arXiv 2505.05470, Eq. 9).

    At σ = 1 the σ inside ``1-σ`` is replaced by ``sigma_max`` (the second entry of the σ grid), as in the reference
    implementation, so the first step injects noise of std exactly ``a``.

    Args:
        sigma: ``[B]`` current noise levels in (0, 1].
        noise_level: ``a`` ≥ 0, scalar or ``[B]``.
        sigma_max: value used for σ in ``1-σ`` where σ == 1.

    Raises:
        ValueError: if some σ == 1 and ``sigma_max`` is None or not in (0, 1).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    at_one = sigma >= 1
    if bool(at_one.any()):
        if sigma_max is None or not 0 < sigma_max < 1:
            raise ValueError("σ = 1 needs sigma_max (the second σ of the schedule, in (0, 1)) to define std_t")
        denom = torch.where(at_one, torch.full_like(sigma, sigma_max), sigma)
    else:
        denom = sigma
    return torch.as_tensor(noise_level, dtype=torch.float32) * torch.sqrt(sigma / (1 - denom))


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level, *, sigma_max: float | None = None,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None) -> StepOutput:
    """Flow-GRPO SDE step (Euler–Maruyama of ``dx = [v + σ_t²/(2t)·(x + (1-t)·v)]dt + σ_t dw``; arXiv 2505.05470 §4.1).

    ``μ = x + v·Δ + std_t²/(2σ)·(x + (1-σ)·v)·Δ``, ``s = std_t·sqrt(-Δ)``, ``x' = μ + s·ε``, with
    ``std_t`` from :func:`flow_grpo_std`. A noise level of 0 gives ``s = 0`` and the Euler ODE step ``x + v·Δ``.

    Args:
        x: ``[B, ...]`` current sample at σ.
        v: ``[B, ...]`` velocity prediction (after CFG) at (x, σ).
        sigma, sigma_next: ``[B]`` or scalars, ``1 ≥ σ > σ_next ≥ 0``.
        noise_level: ``a`` (0.7 in the SD3 recipes), scalar or ``[B]``.
        sigma_max: replaces σ in ``1-σ`` where σ == 1 (pass the schedule's second σ).
        noise: optional ``[B, ...]`` standard normal ε (else drawn from ``generator``).
        prev_sample: if given, the log-probability of this stored ``x'`` is computed instead of sampling (training).
        generator: one generator or one per sample (used only when sampling).

    Returns:
        :class:`StepOutput`.

    Raises:
        ValueError: on σ_next ≥ σ, or σ == 1 without ``sigma_max``.
    """
    x, v = x.float(), v.float()
    b = x.shape[0]
    sigma, sigma_next, a = _per_sample(sigma, b), _per_sample(sigma_next, b), _per_sample(noise_level, b)
    if bool((sigma_next >= sigma).any()):
        raise ValueError("a sampler step must decrease σ (σ_next < σ)")
    dt = sigma_next - sigma
    std_t = flow_grpo_std(sigma, a, sigma_max)
    s_b, dt_b, std_b = _bcast(sigma, x), _bcast(dt, x), _bcast(std_t, x)
    mean = x + v * dt_b + std_b**2 / (2 * s_b) * (x + (1 - s_b) * v) * dt_b
    std = std_t * torch.sqrt(-dt)
    return _finish(mean, std, noise, prev_sample, generator)


def cps_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level, *,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             density: Literal["gaussian", "squared_error"] = "gaussian") -> StepOutput:
    """Coefficient-preserving sampling step (CPS, arXiv 2509.05952).

    ``x̂0 = x - σ·v``, ``x̂1 = x + (1-σ)·v``, ``s = σ_next·sin(a·π/2)``,
    ``μ = (1-σ_next)·x̂0 + sqrt(σ_next² - s²)·x̂1``, ``x' = μ + s·ε``. The marginal ``(1-σ_next)·x0 + σ_next·ε`` is
    preserved exactly whenever x̂0 is exact. A noise level of 0 is the Euler ODE step; the step to σ_next = 0 is
    deterministic (``x' = x̂0``).

    Args:
        density: ``"gaussian"`` (default) — the exact normalised Gaussian log-density averaged over dimensions (a true
            likelihood ratio); ``"squared_error"`` — the public implementations' surrogate ``-mean_dims((x'-μ)²)``
            (no 1/(2s²), no normaliser; its "ratio" is not a likelihood ratio).
        Other arguments as in :func:`sde_step` (no ``sigma_max`` is needed).

    Returns:
        :class:`StepOutput`.
    """
    x, v = x.float(), v.float()
    b = x.shape[0]
    sigma, sigma_next, a = _per_sample(sigma, b), _per_sample(sigma_next, b), _per_sample(noise_level, b)
    if bool((sigma_next >= sigma).any()):
        raise ValueError("a sampler step must decrease σ (σ_next < σ)")
    std = sigma_next * torch.sin(a * math.pi / 2)
    s_b, sn_b, std_b = _bcast(sigma, x), _bcast(sigma_next, x), _bcast(std, x)
    x0_hat = x - s_b * v
    x1_hat = x + (1 - s_b) * v
    mean = (1 - sn_b) * x0_hat + torch.sqrt((sn_b**2 - std_b**2).clamp_min(0)) * x1_hat
    out = _finish(mean, std, noise, prev_sample, generator)
    if density == "squared_error":
        sq = -((out.prev_sample.detach() - mean) ** 2).mean(dim=tuple(range(1, x.ndim)))
        out.log_prob = torch.where(std > 0, sq, torch.zeros_like(sq))
    elif density != "gaussian":
        raise ValueError(f"density must be 'gaussian' or 'squared_error', got {density!r}")
    return out


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> StepOutput:
    """Euler step of the probability-flow ODE, ``x' = x + v·Δ`` (what ``FlowMatchEulerDiscreteScheduler.step`` does).

    Returns a :class:`StepOutput` with ``std = 0`` and ``log_prob = 0`` (no density).
    """
    return sde_step(x, v, sigma, sigma_next, 0.0, sigma_max=0.5)


def _finish(mean, std, noise, prev_sample, generator) -> StepOutput:
    if prev_sample is None:
        if noise is None:
            noise = randn_like_with(mean, generator)
        prev_sample = mean + _bcast(std, mean) * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


def randn_like_with(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; with a list of generators, sample ``i`` uses ``generator[i]`` (so a
    sample's noise does not depend on the batch it is in, as with diffusers' ``randn_tensor``)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32).to(x.device)
                          for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


STEP_FUNCTIONS = {"sde": sde_step, "cps": cps_step}


def kl_gaussian_means(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Closed-form KL between two Gaussian steps sharing the std: ``KL(N(μ,s²)‖N(μ_ref,s²))`` per dimension,
    averaged over dimensions: ``mean_dims((μ - μ_ref)²) / (2·s²)``.

    Args:
        mean, mean_ref: ``[B, ...]`` means of the policy and reference transitions.
        std: ``[B]`` transition std ``s`` (for the Flow-GRPO SDE, ``std_t·sqrt(-Δ)``). The Flow-GRPO reference code
            divides by ``std_t²`` instead (a 1/(-Δ) larger weight on small steps); pass ``std_t`` to reproduce it.

    Returns:
        ``[B]`` float32 (0 where ``std == 0``).
    """
    d = ((mean.float() - mean_ref.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    safe = torch.where(std > 0, std, torch.ones_like(std)).to(d.device)
    return torch.where(std.to(d.device) > 0, d / (2 * safe**2), torch.zeros_like(d))
