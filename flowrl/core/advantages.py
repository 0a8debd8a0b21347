"""Advantage estimators over groups of samples that share a prompt.

Every estimator has the signature ``f(rewards [N], group_ids [N], eps) -> advantages [N]`` (float32) and is looked up
by name in :data:`ADVANTAGE_ESTIMATORS`; :func:`compute_advantages` adds clipping. ``rewards`` must hold the whole
epoch's samples (gathered across data-parallel ranks) so that group and global statistics are exact.
"""

from __future__ import annotations

import math
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


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """RLOO leave-one-out baseline: ``A_i = r_i - mean_{j≠i, g(j)=g(i)} r_j``.

    Equivalently ``A_i = G/(G-1)·(r_i - mean_g r)`` for a group of size ``G ≥ 2``; a group of size 1 has no other
    sample to form a baseline from and gets ``A = 0``. No std normalisation (``eps`` is unused, kept for the common
    signature). Source: Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!"); Ahmadian et al. 2024
    (arXiv 2402.14740).

    Args:
        rewards: ``[N]`` finite rewards.
        group_ids: ``[N]`` integer group id of each sample.

    Returns:
        ``[N]`` float32, unbounded; sums to 0 within every group.
    """
    mean, _, counts = _group_stats(rewards, group_ids)
    g = counts.double()
    # r_i - (G·mean - r_i)/(G-1) = G/(G-1)·(r_i - mean); a singleton has nothing to compare against.
    adv = torch.where(g > 1, g / (g - 1).clamp_min(1) * (rewards.double() - mean), torch.zeros_like(mean))
    return adv.float()


def reinforce_pp_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262, "advantage normalization"): batch-normalised rewards
    ``A_i = (r_i - mean_N r) / (std_N r + eps)`` over *all* ``N`` samples of the epoch (population std).

    ``group_ids`` is ignored (no per-prompt baseline). Outcome rewards only: the paper's per-token KL penalty folded
    into the return is not part of this core (use :func:`flowrl.core.kl_estimate` in the loss instead). A batch whose
    rewards are all equal gets ``A = 0``.

    Returns:
        ``[N]`` float32, zero mean over the batch.
    """
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).float()


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                                     eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262): subtract the group mean, then divide by the batch std of the
    centred values, ``c_i = r_i - mean_g r``, ``A_i = (c_i - mean_N c) / (std_N c + eps)`` (population std over all
    ``N`` samples). ``mean_N c`` is 0 up to rounding (every group's centred values sum to 0); it is subtracted anyway
    so the result is exactly zero-mean. Zero-spread groups get ``A = 0``.

    Returns:
        ``[N]`` float32.
    """
    mean, _, _ = _group_stats(rewards, group_ids)
    c = rewards.double() - mean
    return ((c - c.mean()) / (c.std(unbiased=False) + eps)).float()


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


def cppo_keep_mask(advantages: torch.Tensor, group_ids: torch.Tensor, prune_rate: float) -> torch.Tensor:
    """CPPO completion pruning (arXiv 2503.22342): in each group of size ``G`` keep the
    ``k = ceil((1 - P)·G)`` samples with the largest ``|A|`` and drop the rest from the policy update.

    Samples with small ``|A|`` contribute little gradient, so training only on the top ``k`` saves compute.
    Ties in ``|A|`` are broken by position (the earlier sample wins), so the result is deterministic. ``k`` is
    computed from ``(1 - P)·G`` rounded to 9 decimals before the ceiling, so binary rounding does not add a sample
    (``(1 - 0.7)·10`` is ``3.0000000000000004`` in floating point and must keep 3, not 4). Since ``P < 1`` every
    group keeps at least one sample.

    Args:
        advantages: ``[N]`` finite advantages (already computed over the full groups).
        group_ids: ``[N]`` integer group id of each sample; groups may be interleaved and of different sizes.
        prune_rate: ``P`` in ``[0, 1)``; ``0`` keeps everything.

    Returns:
        ``[N]`` bool, True for kept samples.

    Raises:
        ValueError: mismatched shapes, non-finite advantages, or ``P`` outside ``[0, 1)``.
    """
    if advantages.shape != group_ids.shape or advantages.ndim != 1:
        raise ValueError(f"advantages {tuple(advantages.shape)} and group_ids {tuple(group_ids.shape)} "
                         "must both be [N]")
    if not 0.0 <= float(prune_rate) < 1.0:
        raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate!r}")
    if not torch.isfinite(advantages).all():
        raise ValueError("advantages contain NaN/inf")
    keep = torch.zeros(advantages.shape, dtype=torch.bool)
    mag = advantages.detach().abs().cpu()
    gids = group_ids.cpu()
    for g in torch.unique(gids).tolist():
        idx = torch.nonzero(gids == g).flatten()  # ascending positions
        k = max(1, math.ceil(round((1.0 - float(prune_rate)) * idx.numel(), 9)))
        order = torch.sort(mag[idx], descending=True, stable=True).indices  # stable: ties keep position order
        keep[idx[order[:k]]] = True
    return keep.to(advantages.device)


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo_advantages,
    "global_std": global_std_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
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
