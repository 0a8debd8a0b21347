"""Structured config of the VLM branch (``configs/vlm.yaml``, Hydra groups ``vlm_model`` and ``vlm_algorithm``).

Every estimator and loss is the shared core's (:mod:`flowrl.core`) selected by name; this file only holds numbers
and names, and :func:`validate_vlm` refuses combinations that would train silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowrl.config import ConfigError, to_structured


@dataclass
class VLMModelConfig:
    """The policy. ``pretrained``: a local folder or hub id of a Qwen2-VL / Qwen2.5-VL checkpoint.
    ``lora_rank`` 0 = full fine-tuning (the reference for KL is then a frozen copy), > 0 = peft LoRA on
    ``lora_targets`` (the reference is the same model with the adapter disabled)."""

    pretrained: str = "assets/shapes-qwen2vl"
    family: str = "qwen2_vl"  # qwen2_vl | qwen2_5_vl
    dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    freeze_vision: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 32
    system: str | None = None


@dataclass
class VLMAlgorithmConfig:
    """Update rule, all from :mod:`flowrl.core`: ``advantage`` (``ADVANTAGE_ESTIMATORS``), ``policy_loss``
    (``POLICY_LOSSES``: ppo_clip, dual_clip, gspo, gmpo, reinforce), clip ranges (``clip_range_high`` > ``clip_range``
    = DAPO clip-higher), ``loss_aggregation`` (``AGGREGATION_MODES``; ``constant`` uses ``max_new_tokens`` × samples
    as Dr. GRPO's normaliser), KL (``kl_beta`` × estimator ``kl_estimator`` ∈ k1/k2/k3 against the reference),
    DAPO dynamic sampling and CPPO pruning (``cppo_prune_rate``)."""

    name: str = "grpo"
    advantage: str = "grpo"
    advantage_eps: float = 1e-4
    advantage_clip: float = 0.0  # 0 = no clamp
    policy_loss: str = "ppo_clip"
    clip_range: float = 0.2
    clip_range_high: float | None = None
    dual_clip_c: float = 3.0
    loss_aggregation: str = "step_mean"  # token-mean
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    inner_epochs: int = 1
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    cppo_prune_rate: float = 0.0


@dataclass
class VLMRewardConfig:
    """Reward by registry name with constructor arguments (text rewards: ``vqa_accuracy``, ``vqa_format``,
    ``overlong``, or ``multi`` of them)."""

    name: str = "multi"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class VLMDataConfig:
    """VQA JSON lines (:mod:`flowrl.text.vqa` records; a record may instead carry an ``image`` file path)."""

    train: str = "assets/vqa/vqa_train.jsonl"
    test: str = "assets/vqa/vqa_test.jsonl"
    eval_max_records: int = 0  # 0 = all held-out records


@dataclass
class VLMTrainerConfig:
    seed: int = 0
    epochs: int = 100
    group_size: int = 8
    groups_per_epoch: int = 16
    micro_batch: int = 64
    optimizer_steps_per_epoch: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_base: bool = True
    eval_batch: int = 128
    save_every: int = 0
    output_dir: str = "runs/vlm_grpo"
    threads: int = 0


@dataclass
class VLMTrainConfig:
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    algorithm: VLMAlgorithmConfig = field(default_factory=VLMAlgorithmConfig)
    reward: VLMRewardConfig = field(default_factory=VLMRewardConfig)
    data: VLMDataConfig = field(default_factory=VLMDataConfig)
    trainer: VLMTrainerConfig = field(default_factory=VLMTrainerConfig)


def register_vlm_configs() -> None:
    """Register :class:`VLMTrainConfig` with Hydra's ConfigStore as ``vlm_schema`` (used by ``configs/vlm.yaml``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="vlm_schema", node=VLMTrainConfig)


def to_vlm_config(cfg) -> VLMTrainConfig:
    """Composed Hydra config → :class:`VLMTrainConfig`, refusing unknown keys (:func:`flowrl.config.to_structured`).

    Raises:
        ConfigError: naming every unknown key.
    """
    return to_structured(cfg, VLMTrainConfig, "flowrl/text/config.py")


def validate_vlm(cfg: VLMTrainConfig, world_size: int = 1) -> int:
    """Check the VLM config; return the samples per rank and epoch.

    Raises:
        ConfigError: with a message naming the keys to change.
    """
    from flowrl.core import ADVANTAGE_ESTIMATORS, AGGREGATION_MODES, KL_ESTIMATORS, POLICY_LOSSES, SEQUENCE_LOSSES

    t, a, m = cfg.trainer, cfg.algorithm, cfg.model
    errs = []
    n = t.group_size * t.groups_per_epoch
    if t.group_size < 2:
        errs.append(f"trainer.group_size={t.group_size}: group-relative advantages need ≥ 2 completions per prompt")
    if n % world_size:
        errs.append(f"trainer.group_size × trainer.groups_per_epoch = {n} is not divisible by {world_size} processes")
    elif (n // world_size) % t.optimizer_steps_per_epoch:
        errs.append(f"{n // world_size} samples per rank do not split into trainer.optimizer_steps_per_epoch="
                    f"{t.optimizer_steps_per_epoch} equal optimizer steps")
    if t.micro_batch < 1 or t.epochs < 1 or t.lr <= 0:
        errs.append("trainer.micro_batch, trainer.epochs must be ≥ 1 and trainer.lr > 0")
    if a.advantage not in ADVANTAGE_ESTIMATORS:
        errs.append(f"algorithm.advantage={a.advantage!r}: choose from {sorted(ADVANTAGE_ESTIMATORS)}")
    if a.policy_loss not in POLICY_LOSSES or a.policy_loss == "grpo_guard":
        errs.append(f"algorithm.policy_loss={a.policy_loss!r}: choose from "
                    f"{sorted(k for k in POLICY_LOSSES if k != 'grpo_guard')} (grpo_guard is for SDE steps)")
    if a.loss_aggregation not in AGGREGATION_MODES:
        errs.append(f"algorithm.loss_aggregation={a.loss_aggregation!r}: choose from {list(AGGREGATION_MODES)}")
    if a.policy_loss in SEQUENCE_LOSSES and a.loss_aggregation != "seq_mean_step_mean":
        errs.append(f"algorithm.policy_loss={a.policy_loss} is a sequence-level loss: set "
                    "algorithm.loss_aggregation=seq_mean_step_mean")
    if a.kl_estimator not in KL_ESTIMATORS:
        errs.append(f"algorithm.kl_estimator={a.kl_estimator!r}: choose from {sorted(KL_ESTIMATORS)}")
    if a.kl_beta < 0 or a.clip_range <= 0 or (a.clip_range_high is not None and a.clip_range_high <= 0):
        errs.append("algorithm.kl_beta must be ≥ 0 and the clip ranges > 0")
    if not 0 <= a.cppo_prune_rate < 1:
        errs.append(f"algorithm.cppo_prune_rate={a.cppo_prune_rate} must be in [0, 1)")
    if a.inner_epochs < 1 or (a.dynamic_sampling and a.dynamic_sampling_max_rounds < 1):
        errs.append("algorithm.inner_epochs and algorithm.dynamic_sampling_max_rounds must be ≥ 1")
    if m.temperature <= 0 or m.max_new_tokens < 1:
        errs.append("model.temperature must be > 0 and model.max_new_tokens ≥ 1")
    if m.lora_rank < 0:
        errs.append("model.lora_rank must be ≥ 0 (0 = full fine-tuning)")
    if errs:
        raise ConfigError("invalid VLM config:\n  - " + "\n  - ".join(errs))
    return n // world_size
