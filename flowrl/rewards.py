"""The reward protocol and loader.

A reward is a callable ``reward(images, prompts, metadata) -> dict[str, np.ndarray]`` taking uint8 images
``[B, H, W, 3]`` (RGB), the B prompts and their metadata records (or ``None``), and returning at least the column
``"reward"`` (float ``[B]``) plus any named extra columns (also ``[B]``). Rewards are found by name: first the
``flowrl.rewards`` entry-point group (so a third-party package registers ``name = "module:Class"``), then the
built-ins below. Loading imports only that reward's module.

Differentiable rewards (for ``algorithm=draft``: DRaFT / ReFL, :mod:`flowrl.draft`) additionally implement
``reward.differentiable(images, prompts, metadata) -> torch.Tensor``: ``images`` ``[B, 3, H, W]`` float in [0, 1]
carrying their autograd graph, result ``[B]`` differentiable with respect to the images and on the scale of the
``"reward"`` column of ``__call__`` (equal to it up to the uint8 rounding of the images). The reward model's own
weights stay frozen. :func:`is_differentiable` tells whether an instance has it; :data:`DIFFERENTIABLE_REWARDS` lists
the built-in ones.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

BUILTIN_REWARDS = {
    "geneval_shapes": "flowrl_rewards.geneval_shapes:GenEvalShapesReward",
    "jpeg_compressibility": "flowrl_rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "flowrl_rewards.jpeg:JpegIncompressibility",
    "multi": "flowrl.rewards:MultiReward",
    "remote": "flowrl.reward_server:RemoteReward",
    "clip_score": "flowrl_rewards.clip_score:CLIPScore",
    "pickscore": "flowrl_rewards.pickscore:PickScore",
    "aesthetic": "flowrl_rewards.aesthetic:AestheticReward",
    "hpsv2": "flowrl_rewards.hps:HPSv2Reward",
    "imagereward": "flowrl_rewards.image_reward:ImageRewardScore",
    "vlm_judge": "flowrl_rewards.vlm_judge:VLMJudgeReward",
    "geneval_real": "flowrl_rewards.geneval_real:GenEvalRealReward",
    "ocr": "flowrl_rewards.ocr:OCRReward",
    # RPO's λ-Harmonic reward (CLIP similarity to reference images and to the prompt; algorithm=rpo, flowrl/rpo.py)
    "lambda_harmonic": "flowrl.rpo:LambdaHarmonic",
    # text rewards (VLM branch): completions in place of images
    "vqa_accuracy": "flowrl_rewards.vqa:VQAAccuracy",
    "vqa_format": "flowrl_rewards.vqa:VQAFormat",
    "overlong": "flowrl_rewards.vqa:OverlongPenalty",
}


class Reward(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None) -> dict[str, np.ndarray]: ...


# Built-in rewards with a `differentiable` method (a `multi` of them is differentiable too).
DIFFERENTIABLE_REWARDS = ("clip_score", "pickscore", "aesthetic")


def is_differentiable(reward) -> bool:
    """Whether ``reward`` (an instance) implements ``differentiable(images, prompts, metadata)``; a
    :class:`MultiReward` is differentiable when every component is."""
    if isinstance(reward, MultiReward):
        return all(is_differentiable(r) for r in reward.rewards.values())
    return callable(getattr(reward, "differentiable", None))


def reward_is_differentiable(name: str, args: dict | None = None) -> bool:
    """Whether the reward registered as ``name`` (with constructor ``args``) is differentiable, decided from its
    class without building it (no model is loaded): the class defines ``differentiable``; for ``multi``, every
    component of ``args["components"]`` is differentiable. An unknown name or a module that cannot be imported
    counts as not differentiable (loading it fails later with its own error)."""
    if name == "multi":
        comps = dict((args or {}).get("components") or {})
        return bool(comps) and all(reward_is_differentiable(c, dict(spec.get("args", {}) or {})
                                                            if hasattr(spec, "get") else {})
                                   for c, spec in comps.items())
    try:
        module, _, attr = _target(name).partition(":")
        cls = getattr(importlib.import_module(module), attr)
    except (KeyError, ImportError, AttributeError):
        return False
    return callable(getattr(cls, "differentiable", None))


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


class MultiReward:
    """Several registered rewards combined with weights (``reward=multi``).

    ``components`` maps a registered reward name to its weight, or to ``{"weight": w, "args": {...}}`` (constructor
    arguments). Columns returned: ``reward`` = ``Σ_k w_k r_k``; ``<name>`` = component ``k``'s own ``reward``;
    ``<name>/<column>`` = its extra columns; an extra column that only one component has is also returned under its
    bare name (so the shapes reward's ``strict`` still drives GenEval-style evaluation). With
    ``reward.aggregation=gdpo`` the trainer ignores the summed ``reward`` and normalises each component separately
    (:func:`flowrl.core.multi_reward.gdpo_advantages`); the components are listed in :attr:`weights`.

    Example (one config line): ``reward=multi '+reward.args.components={geneval_shapes: 1.0, jpeg_compressibility: 0.1}'``.

    Raises:
        ValueError: no components, a non-finite weight or a malformed entry.
        KeyError / ImportError: as :func:`load_reward`, for the component that fails (named in the message).
    """

    name = "multi"

    def __init__(self, components: dict[str, Any]):
        if not components:
            raise ValueError("reward 'multi' needs reward.args.components = {name: weight, ...}")
        self.weights: dict[str, float] = {}
        self.rewards: dict[str, Reward] = {}
        for cname, spec in dict(components).items():
            if isinstance(spec, (int, float)):
                weight, args = float(spec), {}
            elif isinstance(spec, dict) or hasattr(spec, "items"):
                spec = dict(spec)
                unknown = set(spec) - {"weight", "args"}
                if unknown:
                    raise ValueError(f"reward component {cname!r}: unknown keys {sorted(unknown)}; use weight / args")
                weight, args = float(spec.get("weight", 1.0)), dict(spec.get("args", {}) or {})
            else:
                raise ValueError(f"reward component {cname!r}: give a weight or {{weight: w, args: {{...}}}}, "
                                 f"got {spec!r}")
            if not np.isfinite(weight):
                raise ValueError(f"reward component {cname!r}: weight {weight} is not finite")
            try:
                self.rewards[cname] = load_reward(cname, **args)
            except (KeyError, ImportError) as e:
                raise type(e)(f"reward component {cname!r} of 'multi' failed to load: {e}") from e
            self.weights[cname] = weight

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        extras: dict[str, list[np.ndarray]] = {}
        total = np.zeros(len(images), dtype=np.float64)
        for cname, fn in self.rewards.items():
            cols = check_reward_output(fn(images, prompts, metadata), len(images), cname)
            out[cname] = cols["reward"]
            total += self.weights[cname] * cols["reward"].astype(np.float64)
            for k, v in cols.items():
                if k != "reward":
                    out[f"{cname}/{k}"] = v
                    extras.setdefault(k, []).append(v)
        for k, vs in extras.items():
            if len(vs) == 1 and k not in out:
                out[k] = vs[0]
        out["reward"] = total.astype(np.float32)
        return out

    def differentiable(self, images, prompts: list[str], metadata: list[dict] | None = None):
        """``Σ_k w_k · r_k.differentiable(images, prompts, metadata)``: the ``reward`` column of ``__call__`` as a
        differentiable function of ``images`` (``[B, 3, H, W]`` float in [0, 1]); returns ``[B]`` float32.

        Raises:
            TypeError: a component has no ``differentiable`` (named in the message).
        """
        total = None
        for cname, fn in self.rewards.items():
            if not is_differentiable(fn):
                raise TypeError(f"reward component {cname!r} of 'multi' is not differentiable; differentiable "
                                f"rewards: {', '.join(DIFFERENTIABLE_REWARDS)}")
            r = self.weights[cname] * fn.differentiable(images, prompts, metadata).float()
            total = r if total is None else total + r
        if total is None:
            raise TypeError("reward 'multi' has no components")
        return total
