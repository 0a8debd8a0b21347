"""Advantage estimators over groups of samples that share a prompt.

Every estimator has the signature ``f(rewards [N], group_ids [N], eps) -> advantages [N]`` (float32) and is looked up
by name in :data:`ADVANTAGE_ESTIMATORS`; :func:`compute_advantages` adds clipping. ``rewards`` must hold the whole
epoch's samples (gathered across data-parallel ranks) so that group and global statistics are exact.
"""

from __future__ import annotations

from typing import Callable

import torch

Estimator = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, group population std and group size, each ``[N]``."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts.shape[0]
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, rewards.double())
    mean = sums / counts
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, (rewards.double() - mean[inverse]) ** 2)
    std = (sq / counts).sqrt()
    return mean[inverse], std[inverse], counts[inverse]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO / Flow-GRPO per-group normalisation: ``A_i = (r_i - mean_g r) / (std_g r + eps)`` (population std).

    Groups whose rewards are all equal get ``A = 0`` (they carry no signal). Source: DeepSeekMath §4.1.2;
    Flow-GRPO (arXiv 2505.05470) Eq. 4 with ``eps = 1e-4``.
    """
    mean, std, _ = _group_stats(rewards, group_ids)
    return ((rewards.double() - mean) / (std + eps)).float()


def global_std_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Flow-GRPO's SD3 variant: subtract the group mean, divide by the std of *all* rewards of the epoch
    (``global_std: true`` in the reference configs)."""
    mean, _, _ = _group_stats(rewards, group_ids)
    std = rewards.double().std(unbiased=False)
    return ((rewards.double() - mean) / (std + eps)).float()


def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): ``A_i = r_i - mean_g r`` (no std normalisation)."""
    mean, _, _ = _group_stats(rewards, group_ids)
    return (rewards.double() - mean).float()


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """``[N]`` bool: the sample's group has reward spread (population std ``> tol``).

    A group whose rewards are all equal has zero advantage under every group-baseline estimator, so its samples
    carry no policy-gradient signal; DAPO's dynamic sampling (arXiv 2503.14476, Eq. 11: keep groups with
    ``0 < |{correct}| < G``) drops them. For real-valued rewards "all correct / all wrong" becomes "zero spread".

    Args:
        rewards: ``[N]`` finite rewards (the whole epoch, gathered across ranks).
        group_ids: ``[N]`` integer group id of each sample.
        tol: a group with std ``≤ tol`` counts as zero-variance.

    Raises:
        ValueError: mismatched shapes.
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [N]")
    _, std, _ = _group_stats(rewards, group_ids)
    return std > tol


def select_groups(keep: torch.Tensor, group_ids: torch.Tensor, max_groups: int | None = None) -> torch.Tensor:
    """``[N]`` bool: samples of the first ``max_groups`` groups (in order of first appearance) among those with
    ``keep`` true — how dynamic sampling fills a fixed-size batch from several rollout rounds. ``keep`` must be
    constant within a group (as from :func:`informative_groups`). ``max_groups=None`` keeps every kept group."""
    chosen: list[int] = []
    for g in dict.fromkeys(group_ids[keep].tolist()):
        if max_groups is not None and len(chosen) >= max_groups:
            break
        chosen.append(g)
    return keep & torch.isin(group_ids, torch.tensor(chosen, dtype=group_ids.dtype))


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo_advantages,
    "global_std": global_std_advantages,
    "dr_grpo": dr_grpo_advantages,
}


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo", eps: float = 1e-4,
                       clip: float | None = 5.0) -> torch.Tensor:
    """Advantages for a whole epoch.

    Args:
        rewards: ``[N]`` finite rewards.
        group_ids: ``[N]`` integer id of each sample's prompt group.
        estimator: a key of :data:`ADVANTAGE_ESTIMATORS`.
        clip: clamp advantages to ``[-clip, clip]`` (Flow-GRPO: 5); ``None`` disables.

    Returns:
        ``[N]`` float32.

    Raises:
        KeyError: unknown estimator (lists the known ones).
        ValueError: non-finite rewards or mismatched shapes.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {estimator!r}; choose from {sorted(ADVANTAGE_ESTIMATORS)}")
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [N]")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf; fix the reward function before computing advantages")
    adv = ADVANTAGE_ESTIMATORS[estimator](rewards.float(), group_ids, eps)
    return adv.clamp(-clip, clip) if clip is not None else adv
