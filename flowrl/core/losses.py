"""Policy losses and loss aggregation on ``[B, T]`` tensors (a denoising step or a token is a step).

Normalisers are explicit: :func:`aggregate_loss` divides a *sum* by a count the caller computed over the whole
optimizer step (all micro-batches, all ranks), so gradient accumulation and data parallelism do not change the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLossOutput:
    """Per-element policy loss and diagnostics.

    Attributes:
        loss: ``[B, T]`` per-step loss (0 where the mask is False).
        ratio: ``[B, T]`` importance ratio ``exp(logp - logp_old)``.
        clipped: ``[B, T]`` bool, the clipped branch was active (counts toward the clip fraction).
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def ppo_clip_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_low: float, clip_high: float | None = None) -> PolicyLossOutput:
    """PPO clipped surrogate per step: ``max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high))`` with ``ρ = exp(logp - logp_old)``.

    Source: Schulman et al. 2017 Eq. 7; Flow-GRPO (arXiv 2505.05470) Eq. 5 applies it per denoising step with
    ``ε = 1e-4``; DAPO's decoupled ``ε_low``/``ε_high`` when ``clip_high`` differs.

    Args:
        log_probs: ``[B, T]`` current log-probabilities (with gradients).
        old_log_probs: ``[B, T]`` rollout log-probabilities (no gradient needed).
        advantages: ``[B]`` (broadcast over steps) or ``[B, T]``.
        mask: ``[B, T]`` bool, steps that count.
        clip_low, clip_high: clip range; ``clip_high`` defaults to ``clip_low``.

    Returns:
        :class:`PolicyLossOutput`.
    """
    clip_high = clip_low if clip_high is None else clip_high
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    ratio = torch.exp(log_probs - old_log_probs.detach())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    m = mask.to(loss.dtype)
    return PolicyLossOutput(loss=loss * m, ratio=ratio, clipped=(clipped > unclipped) & mask.bool())


def reinforce_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, clip_low: float = 0.0, clip_high: float | None = None) -> PolicyLossOutput:
    """Plain REINFORCE (Williams 1992): ``-A·logp`` (gradient ``-A·∇logp``); no ratio clipping."""
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    ratio = torch.exp(log_probs - old_log_probs.detach())
    return PolicyLossOutput(loss=-adv * log_probs * mask.to(log_probs.dtype), ratio=ratio,
                            clipped=torch.zeros_like(mask, dtype=torch.bool))


POLICY_LOSSES = {"ppo_clip": ppo_clip_loss, "reinforce": reinforce_loss}


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str = "step_mean",
                   normaliser: float | None = None) -> torch.Tensor:
    """Reduce a masked ``[B, T]`` loss to a scalar.

    Modes:
        ``step_mean`` (= token-mean): ``Σ loss / normaliser`` where ``normaliser`` is the number of masked steps in
        the whole optimizer step (all micro-batches and ranks; defaults to this micro-batch's count — pass the
        global count when accumulating).
        ``seq_mean_step_mean``: per-sample mean over its masked steps, summed and divided by ``normaliser`` (the
        number of samples in the optimizer step; defaults to ``B``).

    Raises:
        ValueError: unknown mode, or a non-positive normaliser.
    """
    m = mask.to(loss.dtype)
    if mode == "step_mean":
        n = m.sum().item() if normaliser is None else normaliser
        if n <= 0:
            raise ValueError("step_mean normaliser must be positive (no masked steps?)")
        return (loss * m).sum() / n
    if mode == "seq_mean_step_mean":
        per_seq = (loss * m).sum(1) / m.sum(1).clamp_min(1)
        n = loss.shape[0] if normaliser is None else normaliser
        if n <= 0:
            raise ValueError("seq_mean_step_mean normaliser must be positive")
        return per_seq.sum() / n
    raise ValueError(f"unknown loss aggregation {mode!r}; choose 'step_mean' or 'seq_mean_step_mean'")
