"""A Gaussian toy on which the samplers of :mod:`flowrl.flow.sde` can be checked against exact marginals.

The math
--------
Data ``x0 ~ N(m, s0²·I)`` in ``dim`` dimensions (isotropic, so every coordinate is an independent 1-D problem).
Under the flow-matching interpolation ``x_σ = (1-σ)·x0 + σ·ε`` (ε ~ N(0, I)) the marginal at σ is Gaussian::

    E[x_σ] = (1-σ)·m,        Var[x_σ] = V(σ) = (1-σ)²·s0² + σ²      (per coordinate)

and, since (ε - x0, x_σ) is jointly Gaussian, the exact (minimum-MSE) velocity is the linear regression::

    v*(x, σ) = E[ε - x0 | x_σ = x] = -m + (σ - (1-σ)·s0²) / V(σ) · (x - (1-σ)·m)

(``Cov(ε - x0, x_σ) = σ - (1-σ)·s0²``). The predictions derived from it are posterior means, not samples:
``x̂0 = x - σ·v* = E[x0 | x_σ]`` and ``x̂1 = x + (1-σ)·v* = E[ε | x_σ]``. At σ = 1 this gives ``x̂0 = m``.

What theory says for each sampler (all steps are affine in x plus Gaussian noise, so moments propagate exactly as
``mean' = α·mean + β``, ``var' = α²·var + s²``):

* All three samplers keep the *mean* exact: at x = (1-σ)·m the velocity is exactly -m, so every affine step maps the
  marginal mean onto (1-σ')·m (only float rounding remains).
* ODE (Euler): the exact probability-flow ODE preserves the marginals; Euler adds a first-order discretisation error
  (halves when the steps double). With s0 = 0 (point mass) trajectories are straight lines and Euler is exact.
  With s0 = 0.3 the shifted 10-step grid's last big step (0.278 → 0.009) under-disperses strongly.
* CPS (coefficient-preserving): ``x' = (1-σ')·x̂0 + c·x̂1 + s·ξ`` with ``s = σ'·sin(aπ/2)``, ``c = sqrt(σ'² - s²)``.
  It is exact if x̂0 is the true x0 (then x̂1 = ε and x' = (1-σ')x0 + σ'ε' exactly) — here that is the point mass
  s0 = 0. With the posterior mean it is *under*-dispersed: started from the exact marginal at σ, one step loses
  ``Var(x0 | x_σ)·((1-σ') - c·(1-σ)/σ)²`` of variance (Cauchy–Schwarz), where
  ``Var(x0 | x_σ) = s0² - ((1-σ)·s0²)²/V(σ)``. The mismatch factor is O(1), not O(step), because every step replaces
  the fixed fraction sin²(aπ/2) of the noise by fresh noise; so the deficit does not vanish as steps → ∞.
* SDE (Flow-GRPO Euler–Maruyama): the continuous SDE preserves the marginals, but (i) ``std_t = a·sqrt(σ/(1-σ))``
  diverges at σ → 1: the first step from σ = 1 injects noise of std exactly a (σ_max substitution) and the second
  one ≈ a as well, whatever the step count, which leaves a variance excess of ≈ 0.1 after the first steps even at
  hundreds of steps (the drift pulls it back later); (ii) at 10 steps the drift ``std_t²/(2σ)·(x + (1-σ)v)·Δ`` is
  too coarse near the end: for a point mass it leaves variance ≈ 0.06 at σ = 0.009 where σ² ≈ 8e-5 is the target.
  The final-step error does vanish (first order) as the steps increase.

Shapes and units
----------------
Particles are ``[n, dim]`` float32; statistics are pooled over particles and coordinates (``n·dim`` samples).
Errors are in data units: ``mean_err = empirical mean - (1-σ')·m``; ``var_err = empirical variance - V(σ')``
(absolute, in squared data units); ``mean_err_exact`` and ``var_err_exact`` are the same errors computed by
propagating the first two moments through each step exactly (no Monte-Carlo noise; each step's α, β and s are read
off the step functions themselves, in float32).
"""

from __future__ import annotations

import torch

from flowrl.flow.sde import cps_step, ode_step, sde_step


def shifted_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The σ grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`` (no dynamic
    shifting), ``[steps + 1]`` float32 from 1 to 0.

    The scheduler spaces ``steps`` values linearly between 1 and its ``sigma_min`` (the shifted σ of the last training
    timestep, ``shift(1/num_train_timesteps)``) and shifts them again: ``shift(s) = shift·s / (1 + (shift-1)·s)``.
    """
    def sh(s):
        return shift * s / (1 + (shift - 1) * s)

    sigma_min = sh(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    s = sh(torch.linspace(1.0, float(sigma_min), steps, dtype=torch.float64))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def marginal_var(sigma: float, s0: float) -> float:
    """``V(σ) = (1-σ)²·s0² + σ²``, the per-coordinate variance of ``x_σ``."""
    return (1 - sigma) ** 2 * s0**2 + sigma**2


def exact_velocity(x: torch.Tensor, sigma: float, m: float, s0: float) -> torch.Tensor:
    """``v*(x, σ) = E[ε - x0 | x_σ = x] = -m + (σ - (1-σ)·s0²)/V(σ)·(x - (1-σ)·m)`` for ``x`` ``[n, dim]``."""
    gain = (sigma - (1 - sigma) * s0**2) / marginal_var(sigma, s0)
    return -m + gain * (x - (1 - sigma) * m)


def _step(kind: str, x, v, sigma, sigma_next, noise_level, sigma_max, noise):
    if kind == "ode":
        return ode_step(x, v, sigma, sigma_next)
    if kind == "sde":
        return sde_step(x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max, noise=noise)
    if kind == "cps":
        return cps_step(x, v, sigma, sigma_next, noise_level, noise=noise)
    raise ValueError(f"kind must be 'ode', 'sde' or 'cps', got {kind!r}")


def marginal_errors(kind: str, noise_level: float, steps: int, *, n: int = 20000, dim: int = 16, m: float = 0.5,
                    s0: float = 0.3, shift: float = 3.0, seed: int = 0) -> list[dict]:
    """Run ``n`` particles of the Gaussian toy through the ``steps``-step shifted (SD3) schedule and compare the
    empirical moments after every step with the exact marginal at that σ.

    Args:
        kind: ``"ode"`` (``noise_level`` ignored), ``"sde"`` (Flow-GRPO SDE) or ``"cps"``.
        noise_level: the sampler's ``a``.
        steps: number of sampling steps (the grid is :func:`shifted_sigmas` ``(steps, shift)``).
        n, dim: particles and coordinates per particle; start is exact noise ``x ~ N(0, I)`` at σ = 1.
        m, s0: data mean and std (``s0 = 0`` is a point mass; its marginal variance is σ²).
        seed: seeds the initial noise and the per-step noise.

    Returns:
        One dict per step ``i`` (σ_i → σ_{i+1}) with keys ``step``, ``sigma``, ``sigma_next``, ``target_mean``,
        ``target_var``, ``mean_err``, ``var_err`` (empirical, pooled over ``n·dim`` samples), ``mean_err_exact`` and
        ``var_err_exact`` (moment propagation, no sampling noise). All floats.
    """
    sigmas = shifted_sigmas(steps, shift)
    sigma_max = float(sigmas[1])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    mom_mean, mom_var = 0.0, 1.0  # exact moments of x at σ = 1
    probe = torch.tensor([[0.0], [1.0]])
    rows = []
    for i in range(steps):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        noise = torch.randn(n, dim, generator=gen)
        x = _step(kind, x, exact_velocity(x, s, m, s0), sigmas[i], sigmas[i + 1], noise_level, sigma_max,
                  noise).prev_sample
        # the step is x' = α·x + β + std·ξ; read α, β, std off the step function itself
        out = _step(kind, probe, exact_velocity(probe, s, m, s0), sigmas[i], sigmas[i + 1], noise_level, sigma_max,
                    torch.zeros_like(probe))
        beta = float(out.mean[0, 0])
        alpha = float(out.mean[1, 0]) - beta
        std = float(out.std[0])
        mom_mean, mom_var = alpha * mom_mean + beta, alpha**2 * mom_var + std**2
        target_mean, target_var = (1 - sn) * m, marginal_var(sn, s0)
        xd = x.double()
        rows.append(dict(step=i, sigma=s, sigma_next=sn, target_mean=target_mean, target_var=target_var,
                         mean_err=float(xd.mean()) - target_mean, var_err=float(xd.var()) - target_var,
                         var_err_exact=mom_var - target_var, mean_err_exact=mom_mean - target_mean))
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    """Render :func:`marginal_errors` rows as a fixed-width text table."""
    lines = [title] if title else []
    lines.append(f"{'step':>4} {'σ→σ_next':>17} {'target var':>11} {'mean err':>10} {'var err':>10} "
                 f"{'var err (exact moments)':>24}")
    for r in rows:
        lines.append(f"{r['step']:>4} {r['sigma']:>8.5f}→{r['sigma_next']:<8.5f} {r['target_var']:>11.6f} "
                     f"{r['mean_err']:>+10.2e} {r['var_err']:>+10.2e} {r['var_err_exact']:>+24.3e}")
    return "\n".join(lines)


__all__ = ["shifted_sigmas", "marginal_var", "exact_velocity", "marginal_errors", "format_table"]

