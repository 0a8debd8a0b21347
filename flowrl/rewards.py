"""The reward protocol and loader.

A reward is a callable ``reward(images, prompts, metadata) -> dict[str, np.ndarray]`` taking uint8 images
``[B, H, W, 3]`` (RGB), the B prompts and their metadata records (or ``None``), and returning at least the column
``"reward"`` (float ``[B]``) plus any named extra columns (also ``[B]``). Rewards are found by name: first the
``flowrl.rewards`` entry-point group (so a third-party package registers ``name = "module:Class"``), then the
built-ins below. Loading imports only that reward's module.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

BUILTIN_REWARDS = {
    "geneval_shapes": "flowrl_rewards.geneval_shapes:GenEvalShapesReward",
}


class Reward(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None) -> dict[str, np.ndarray]: ...


def _target(name: str) -> str:
    for ep in entry_points(group="flowrl.rewards"):
        if ep.name == name:
            return ep.value
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    known = sorted({ep.name for ep in entry_points(group="flowrl.rewards")} | set(BUILTIN_REWARDS))
    raise KeyError(f"unknown reward {name!r}; registered rewards: {known}")


def load_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with ``kwargs``.

    Raises:
        KeyError: unknown name (lists the registered ones).
        ImportError: the reward's module cannot be imported (e.g. a missing optional dependency).
    """
    module, _, attr = _target(name).partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(**kwargs)


def check_reward_output(out: dict[str, np.ndarray], batch: int, name: str) -> dict[str, np.ndarray]:
    """Validate a reward's output: a ``"reward"`` column, every column of length ``batch``.

    Raises:
        ValueError: on a missing ``reward`` column or a wrong length.
    """
    if "reward" not in out:
        raise ValueError(f"reward {name!r} returned no 'reward' column (got {sorted(out)})")
    for k, v in out.items():
        if len(v) != batch:
            raise ValueError(f"reward {name!r} column {k!r} has {len(v)} values for {batch} images")
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
