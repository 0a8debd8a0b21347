"""The shared policy-gradient core: pure torch on ``[B, T]`` tensors plus a mask (a denoising step or a token is a
step). Never imports diffusers or transformers. Estimators and losses are selected by name from small registries."""

from flowrl.core.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, informative_groups, select_groups
from flowrl.core.losses import POLICY_LOSSES, aggregate_loss, ppo_clip_loss

__all__ = ["ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "aggregate_loss", "compute_advantages", "informative_groups", "ppo_clip_loss",
           "select_groups"]
