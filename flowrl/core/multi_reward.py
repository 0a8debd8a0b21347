"""Combining several rewards into one advantage (no model code; pure torch on ``[N]`` vectors).

Two ways, selected by ``reward.aggregation``:

* ``weighted_sum``: ``r = Σ_k w_k r_k``, then any advantage estimator on ``r`` (what a single combined reward does).
* ``gdpo``: GDPO (Group reward-Decoupled normalization Policy Optimization, arXiv 2601.05242, §3): each component
  gets its own group-relative advantage ``A_k`` (the chosen estimator, e.g. GRPO's per-group z-score), the advantages
  are summed with the weights, ``A = Σ_k w_k A_k``, and the sum is normalised over the whole batch,
  ``(A - mean A) / (std A + eps)``. Summing rewards before normalising lets the component with the largest spread
  dominate and collapses distinct reward combinations onto the same advantage; normalising per component keeps them
  apart (MixGRPO's ``advantage_aggr`` offers the same choice).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flowrl.core.advantages import compute_advantages


def gdpo_advantages(components: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_ids: torch.Tensor,
                    estimator: str = "grpo", eps: float = 1e-4, clip: float | None = 5.0) -> torch.Tensor:
    """GDPO advantages ``[N]`` from per-component rewards.

    Args:
        components: ``{name: [N] rewards}`` (the whole epoch, gathered across ranks).
        weights: ``{name: weight}``; every component needs a weight (extra weights are an error too).
        group_ids: ``[N]`` prompt-group id of each sample.
        estimator: per-component advantage estimator (a key of ``ADVANTAGE_ESTIMATORS``).
        eps: added to the std in the per-component estimator and in the batch normalisation.
        clip: clamp of the final advantages (``None``: no clamp).

    Returns:
        ``[N]`` float32, zero-mean and unit-std over the batch (before clamping) unless every ``A`` is equal.

    Raises:
        ValueError: component and weight names differ, or shapes differ / rewards are not finite.
        KeyError: unknown estimator.
    """
    if set(components) != set(weights) or not components:
        raise ValueError(f"GDPO needs one weight per reward component: components {sorted(components)}, "
                         f"weights {sorted(weights)}")
    total = torch.zeros(group_ids.shape[0], dtype=torch.float64)
    for name, r in components.items():
        total += float(weights[name]) * compute_advantages(r, group_ids, estimator, eps, clip=None).double()
    out = (total - total.mean()) / (total.std(unbiased=False) + eps)
    out = out.float()
    return out.clamp(-clip, clip) if clip is not None else out


def weighted_sum(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``Σ_k w_k r_k`` as float32 ``[N]``.

    Raises:
        ValueError: component and weight names differ.
    """
    if set(components) != set(weights) or not components:
        raise ValueError(f"one weight per reward component: components {sorted(components)}, weights {sorted(weights)}")
    return sum(float(weights[k]) * components[k].double() for k in components).float()
