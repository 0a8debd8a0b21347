"""Structured configuration (Hydra / OmegaConf dataclasses) for flowrl training and evaluation.

The dataclasses are the schema: Hydra merges the YAML groups in ``configs/`` into them, so an unknown key or a wrong
type fails at start-up. :func:`validate` then checks the derived batch arithmetic and refuses combinations that would
train silently wrong, with messages that say what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from flowrl.prompt_sets import KINDS as PROMPT_KINDS


@dataclass
class ModelConfig:
    """Which model and how to load it.

    ``pretrained`` is a local diffusers folder or a hub id; ``max_sequence_length`` is the number of T5 tokens
    (zeros when ``load_t5`` is false); ``resolution`` in pixels; LoRA rank/alpha/targets as in peft.

    ``lora_rank=0`` is full fine-tuning (the same convention as the VLM trainer): the denoiser's own weights are
    trained as float32 master weights (all of them, or those whose parameter name contains one of
    ``full_finetune_modules``), the text encoders and the VAE stay frozen, and the reference policy (KL, DPO, the
    NFT anchor) is a frozen copy of the initial denoiser, kept only when one of those needs it
    (:func:`flowrl.models.sd3.unfreeze_full`). Checkpoints then hold the whole denoiser (``transformer/``).
    """

    family: str = "sd3"  # sd3 (SD3/SD3.5) | flux (FLUX.1) | sana (SANA) | unet (SD1.x/2.x, DDPO)
    pretrained: str = MISSING
    dtype: str = "float32"  # float32 | float16 | bfloat16
    load_t5: bool = True
    max_sequence_length: int = 256
    resolution: int = 512
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    # full fine-tuning (lora_rank=0) only: parameter-name substrings to unfreeze, e.g. [transformer_blocks]; [] = all
    full_finetune_modules: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False


@dataclass
class SamplerConfig:
    """Rollout sampler: SDE kind, noise level ``a``, step counts, CFG and which steps are stochastic/trained.

    ``train_steps`` denoising steps when sampling for training, ``eval_steps`` (ODE) for evaluation — Flow-GRPO's
    denoising reduction. ``timestep_fraction`` of the stochastic steps are trained (Flow-GRPO: 0.99 → 9 of 10; the
    last, tiny-std step is never trained). ``sde_window`` > 0 makes only a window of that many steps stochastic
    (Flow-GRPO-Fast); its start is drawn per group in ``[window_start_min, window_start_max)``.
    """

    kind: str = "sde"  # sde | cps | dance
    noise_level: float = 0.7
    density: str = "gaussian"  # gaussian | squared_error (CPS only)
    train_steps: int = 10
    eval_steps: int = 40
    guidance_scale: float = 4.5
    eval_guidance_scale: float = 4.5
    timestep_fraction: float = 0.99
    sde_window: int = 0
    # one initial noise x_T per group (DanceGRPO, MixGRPO): with ODE steps before an SDE window, the group's samples
    # share their trajectory up to the window, so the reward spread is caused by the window's noise alone
    shared_initial_noise: bool = False
    window_start_min: int = 0
    window_start_max: int = -1  # -1: train_steps // 2
    # > 0: each sample trains only this many of its trainable steps, drawn uniformly without replacement per sample
    # and epoch (DanceGRPO's random timestep subset); the update then costs steps_per_sample / trainable steps
    steps_per_sample: int = 0
    # MixGRPO (arXiv 2507.21802): > 0 = only a window of this many steps is stochastic and trained (ODE elsewhere);
    # the window is the same for every group and slides by `mixgrpo_stride` steps every `mixgrpo_shift_interval`
    # epochs, rolling back to step 0 past the last start (flowrl.flow.samplers.mixgrpo_train_steps)
    mixgrpo_window: int = 0
    mixgrpo_shift_interval: int = 25
    mixgrpo_stride: int = 1
    mixgrpo_roll_back: bool = True
    # ≥ 0 (model.family=unet, kind=cps): DDIM-η as the rollout policy (DDPO: η = 1) — each step's CPS noise level
    # is the one whose std equals DDIM's σ_t(η) (UNetAdapter.ddim_noise_levels); -1 = off (sampler.noise_level)
    ddim_eta: float = -1.0


@dataclass
class AlgorithmConfig:
    """Update rule: advantage estimator, clipping, policy loss, KL to the reference, inner epochs.

    ``name``: ``flow_grpo`` (likelihood ratio, per-step PPO), ``nft`` (DiffusionNFT on the forward process) or ``dpo``
    (Flow-DPO: Diffusion-DPO's preference loss on velocity errors, see :mod:`flowrl.core.dpo` and
    :meth:`flowrl.trainer.Trainer.update_dpo`) or ``draft`` (differentiable-reward fine-tuning, DRaFT-K / ReFL, see
    :mod:`flowrl.draft`; needs a differentiable reward) or ``rpo`` (subject-driven RPO: λ-Harmonic preferences
    against reference images plus a reconstruction loss, early stopping; :mod:`flowrl.rpo`).

    Flow-DPO keys: ``dpo_pairs`` is ``"online"`` (each epoch's rollout groups are scored and the best and worst image
    of every group with reward spread form a pair) or the path of a JSON-lines pairs file
    ``{"prompt", "chosen", "rejected"}`` (offline preference data, no rollout and no reward during training).
    ``dpo_beta`` is Diffusion-DPO's β (its ``beta_dpo``: the paper's β·T folded into one constant) for squared
    velocity errors averaged over the latent dimensions; the loss is ``-log σ(-(β/2)·[(e_θ^w - e_ref^w) -
    (e_θ^l - e_ref^l)])``. Larger β = a tighter implicit KL anchor to the reference (the per-pair weight
    ``σ(-z)`` vanishes after a smaller change of the errors). Default 100, set for the embedded shapes model at
    lr 1e-3 (reasoning and measurements in ``configs/algorithm/flow_dpo.yaml``); the Diffusion-DPO script's 5000
    (ε errors, full fine-tuning at a tiny learning rate) saturates the sigmoid there after one step.
    """

    name: str = "flow_grpo"  # flow_grpo | nft | raft (reward-ranked flow-matching fine-tuning) | dpo | draft | rpo
    advantage: str = "grpo"  # see flowrl.core.ADVANTAGE_ESTIMATORS
    advantage_eps: float = 1e-4
    advantage_clip: float = 5.0
    policy_loss: str = "ppo_clip"  # see flowrl.core.POLICY_LOSSES
    clip_range: float = 1e-4
    clip_range_high: float | None = None
    loss_aggregation: str = "step_mean"  # step_mean (Flow-GRPO) | seq_mean_step_mean
    kl_beta: float = 0.04
    kl_std: str = "transition"  # transition (exact KL) | reference (Flow-GRPO code: divides by std_t², not s²)
    inner_epochs: int = 1
    # DAPO dynamic sampling: drop groups whose rewards are all equal and roll out further rounds of fresh groups
    # until `trainer.groups_per_epoch` informative groups are collected (at most `dynamic_sampling_max_rounds`).
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    # DiffusionNFT (name=nft): implicit-policy strength β and forward-process draws per clean sample and update
    nft_beta: float = 1.0
    nft_timesteps: int = 1
    # velocity NFT regresses: 1.0 = the conditional velocity (the paper's CFG-free training); g > 1 = the CFG-guided
    # velocity v_u + g·(v_c - v_u), i.e. the very policy that rolls out and is evaluated with guidance g
    nft_guidance_scale: float = 1.0
    # common random numbers: every sample of a group uses the same forward-process draws (σ, ε), so the part of the
    # regression noise shared by the group cancels in the advantage-weighted sum (Σ_group (2r-1) = 0)
    nft_shared_draws: bool = False
    # with nft_guidance_scale = g > 1: train the guided field through the conditional branch only,
    # u = sg(v_u) + g·(v_c - sg(v_u)) (the unconditional branch gets no NFT gradient, whose weight would be 1 - g < 0),
    # and hold the unconditional velocity at the reference (LoRA disabled) with nft_uncond_anchor·‖v_u - v_u_ref‖²
    nft_detach_uncond: bool = False
    nft_uncond_anchor: float = 0.0
    # Flow-DPO (name=dpo): "online" (best/worst of each rollout group) or a JSON-lines pairs file; β of the DPO loss
    dpo_pairs: str = "online"
    dpo_beta: float = 100.0
    # Differentiable-reward fine-tuning (name=draft, flowrl/draft.py): draft_mode "draft" = DRaFT-K (Clark et al.
    # 2023, arXiv 2309.17400: back-propagate the reward through the last draft_k ODE steps and the VAE decoder),
    # "refl" = ReFL (Xu et al. 2023, arXiv 2304.05977: stop at a random step t in [refl_step_range[0],
    # refl_step_range[1]) of the sampler's train_steps and back-propagate through one prediction x̂0 = x_t - σ_t·v).
    # Loss -draft_reward_scale·mean(reward) over the global batch; draft_lv_samples = n > 0 (DRaFT-LV, K=1 only)
    # adds n re-noisings of the final step per sample. draft_eval_reward (a registered reward name, optional, with
    # draft_eval_reward_args) is scored on the same images for logging only (e.g. geneval_shapes's `strict`).
    draft_mode: str = "draft"
    draft_k: int = 1
    draft_lv_samples: int = 0
    refl_step_range: list[int] = field(default_factory=lambda: [7, 10])
    draft_reward_scale: float = 1.0
    draft_eval_reward: str = ""
    draft_eval_reward_args: dict[str, Any] = field(default_factory=dict)
    # RPO (name=rpo, flowrl/rpo.py; Miao et al. 2024, arXiv 2407.12164): subject-driven fine-tuning. Generated images of
    # the `train` prompts of rpo_prompts (with the subject token rpo_token) are paired with the reference images
    # rpo_references (folder or glob); the reference wins with probability σ(R_ref - R_gen), R the λ-Harmonic reward
    # 1/(λ/s_img + (1-λ)/s_txt) (λ = rpo_label_lambda, null = rpo_lambda); loss = Diffusion-DPO (β = dpo_beta) +
    # rpo_recon_weight × flow matching on the references (conditioned on rpo_instance_prompt). Every rpo_eval_every
    # epochs the mean λ-Harmonic score (λ = rpo_lambda) of rpo_val_images images per `val` prompt is validated;
    # checkpoints/best keeps the best, and training stops after rpo_patience evaluations without improvement.
    rpo_references: str = "assets/rpo_subject"
    rpo_prompts: str = "assets/prompts/rpo_subject.jsonl"
    rpo_token: str = "sks"
    rpo_instance_prompt: str = "a photo of a sks star"
    rpo_lambda: float = 0.3
    rpo_label_lambda: float | None = None
    rpo_recon_weight: float = 1.0
    rpo_eval_every: int = 1
    rpo_patience: int = 3
    rpo_val_images: int = 2


@dataclass
class RewardConfig:
    """Reward by registry name (see :mod:`flowrl.rewards`) with constructor arguments."""

    name: str = "geneval_shapes"
    args: dict[str, Any] = field(default_factory=dict)
    # weighted_sum: advantages of the (possibly multi-) reward's `reward` column; gdpo: per-component advantages,
    # weighted, summed and batch-normalised (needs reward=multi; see flowrl.core.multi_reward)
    aggregation: str = "weighted_sum"


@dataclass
class DataConfig:
    """Prompt files (training split and held-out split): GenEval metadata JSON lines, OCR prompts with the text in
    double quotes, or plain prompt lists (``.txt`` / CSV / JSON lines; see :mod:`flowrl.prompt_sets`)."""

    train: str = "assets/prompts/shapes_train.jsonl"
    test: str = "assets/prompts/shapes_test.jsonl"
    kind: str | None = None  # one of flowrl.prompt_sets.KINDS ("geneval" | "ocr" | "plain"); None: detected
    balance_tags: bool = True  # draw training prompts with equal probability per GenEval tag


@dataclass
class TrainerConfig:
    """Loop sizes, optimiser, EMA, logging and checkpointing.

    Per epoch ``groups_per_epoch`` prompts × ``group_size`` images are sampled across all ranks; each rank rolls out
    and trains its share in micro-batches of ``micro_batch`` samples; ``optimizer_steps_per_epoch`` splits an epoch's
    gradient accumulation (over samples and trained steps) into that many optimizer steps.
    """

    seed: int = 0
    epochs: int = 100
    group_size: int = 24
    groups_per_epoch: int = 48
    micro_batch: int = 8
    optimizer_steps_per_epoch: int = 2
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema: bool = True
    ema_decay: float = 0.9
    ema_every: int = 8
    mixed_precision: str = "no"  # no | fp16 | bf16: transformer forwards under torch.autocast; steps/losses fp32
    eval_every: int = 0  # epochs; 0 = only the final evaluation
    eval_images_per_prompt: int = 4
    eval_max_prompts: int = 0  # 0 = all held-out prompts
    eval_batch: int = 32
    eval_base: bool = True
    save_every: int = 0  # epochs; 0 = only at the end
    log_images_every: int = 10
    output_dir: str = "runs/flowgrpo"
    resume: str = ""  # "" (fresh run) | "auto" (latest complete checkpoint in output_dir) | a checkpoint folder
    threads: int = 0  # torch CPU threads; 0 = all cores shared among the local ranks (CPU only)
    # shard the denoiser with FSDP2 (full fine-tuning, model.lora_rank=0, ≥ 2 processes; flowrl/fsdp.py); also on
    # when `accelerate launch` brings an FSDP config (configs/accelerate/fsdp_*.yaml)
    fsdp: bool = False
    # DeepSpeed ZeRO for full fine-tuning (model.lora_rank=0, ≥ 2 processes; flowrl/deepspeed_zero.py): 0 = off,
    # 2 = ZeRO-2 (optimizer states and gradients partitioned); also set by `accelerate launch` with a DeepSpeed
    # config (configs/accelerate/deepspeed_zero2_8gpu.yaml). Needs `pip install deepspeed` (flowrl[deepspeed]).
    deepspeed_zero: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore as ``train_schema`` (used by ``configs/train.yaml``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


class ConfigError(ValueError):
    """A configuration that cannot train correctly; the message says what to change."""


def to_structured(cfg, schema, where: str = "flowrl/config.py"):
    """Convert a composed Hydra config to the dataclass ``schema`` (sections of dataclasses), refusing keys the schema
    does not know (Hydra lets ``+group.key=value`` add them; a typo there must not be silently ignored).

    Raises:
        ConfigError: naming every unknown key and the file that defines the schema.
    """
    import dataclasses

    from omegaconf import OmegaConf

    sections = {f.name: f for f in dataclasses.fields(schema)}
    unknown = []
    for name, f in sections.items():
        known = {g.name for g in dataclasses.fields(f.default_factory())}
        unknown += [f"{name}.{k}" for k in cfg.get(name, {}) if k not in known]
    unknown += [k for k in cfg if k not in sections]
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; check the spelling against {where}")
    return OmegaConf.to_object(cfg)


def to_train_config(cfg) -> TrainConfig:
    """Composed Hydra config → :class:`TrainConfig` (:func:`to_structured`).

    Raises:
        ConfigError: naming every unknown key.
    """
    return to_structured(cfg, TrainConfig)


@dataclass
class Derived:
    """Numbers derived from the config for one rank: samples per epoch (global and per rank), micro-batches per
    rank, micro-batches per optimizer step, trained steps per trajectory."""

    samples_per_epoch: int
    samples_per_rank: int
    micro_batches_per_rank: int
    micro_batches_per_opt_step: int


def _draft_errors(cfg: TrainConfig) -> list[str]:
    """Refusals of ``algorithm.name=draft`` (DRaFT-K / ReFL, :mod:`flowrl.draft`): a reward without a
    ``differentiable`` method, ``draft_k`` outside ``[1, sampler.train_steps]``, an unknown ``draft_mode``, a
    ``refl_step_range`` outside ``[0, train_steps)``, DRaFT-LV with K ≠ 1 or ReFL, and the settings DRaFT has no use
    for (KL, dynamic sampling, GDPO). The reward is checked from its class, without loading a model."""
    from flowrl.rewards import DIFFERENTIABLE_REWARDS, reward_is_differentiable

    s, a, r = cfg.sampler, cfg.algorithm, cfg.reward
    errs = []
    if not reward_is_differentiable(r.name, dict(r.args or {})):
        what = ("not every component of reward=multi is" if r.name == "multi" else f"reward={r.name} is not")
        errs.append(f"algorithm=draft needs a differentiable reward ({', '.join(DIFFERENTIABLE_REWARDS)}, or "
                    "reward=multi of them), e.g. `reward=clip_score reward.args.model=openai/clip-vit-large-patch14`, "
                    f"but {what} differentiable (no `differentiable(images, prompts, metadata)` method: DRaFT/ReFL "
                    "back-propagate the reward into the model); a non-differentiable score can still be logged on the "
                    f"same images with algorithm.draft_eval_reward={r.name if r.name != 'multi' else 'geneval_shapes'}")
    if a.draft_mode not in ("draft", "refl"):
        errs.append(f"algorithm.draft_mode={a.draft_mode!r}: choose 'draft' (DRaFT-K: gradient through the last "
                    "algorithm.draft_k sampler steps) or 'refl' (ReFL: one x̂0 prediction at a random step of "
                    "algorithm.refl_step_range)")
    if not isinstance(a.draft_k, int) or not 1 <= a.draft_k <= s.train_steps:
        errs.append(f"algorithm.draft_k={a.draft_k}: DRaFT-K back-propagates through the last K of the "
                    f"sampler.train_steps={s.train_steps} steps; set 1 ≤ draft_k ≤ {s.train_steps} (1 = DRaFT-1)")
    if a.draft_mode == "refl":
        rng = list(a.refl_step_range or [])
        if (len(rng) != 2 or not all(isinstance(v, int) for v in rng)
                or not 0 <= rng[0] < rng[1] <= s.train_steps):
            errs.append(f"algorithm.refl_step_range={rng}: ReFL stops at a step index t drawn from [lo, hi), which "
                        f"must lie in [0, sampler.train_steps={s.train_steps}): set 0 ≤ lo < hi ≤ {s.train_steps}, "
                        f"e.g. [{(3 * s.train_steps) // 4}, {s.train_steps}]")
    if a.draft_lv_samples < 0:
        errs.append(f"algorithm.draft_lv_samples={a.draft_lv_samples} must be ≥ 0 (0 = plain DRaFT)")
    elif a.draft_lv_samples > 0 and (a.draft_mode != "draft" or a.draft_k != 1):
        errs.append("algorithm.draft_lv_samples > 0 is DRaFT-LV, defined for draft_mode=draft with draft_k=1: set "
                    "algorithm.draft_k=1 (and draft_mode=draft) or algorithm.draft_lv_samples=0")
    if not (isinstance(a.draft_reward_scale, (int, float)) and math.isfinite(a.draft_reward_scale)
            and a.draft_reward_scale > 0):
        errs.append(f"algorithm.draft_reward_scale={a.draft_reward_scale} must be finite and > 0 (the loss is "
                    "-scale·mean(reward))")
    if a.kl_beta > 0:
        errs.append("algorithm.name=draft has no likelihood and no KL term: set algorithm.kl_beta=0")
    if a.dynamic_sampling:
        errs.append("algorithm.name=draft has no groups or advantages: set algorithm.dynamic_sampling=false")
    if a.inner_epochs != 1:
        errs.append("algorithm.name=draft uses each sample once (its images are regenerated after every optimizer "
                    "step): set algorithm.inner_epochs=1")
    if r.aggregation == "gdpo":
        errs.append("reward.aggregation=gdpo normalises group advantages, which algorithm=draft does not use: set "
                    "reward.aggregation=weighted_sum (reward=multi is then differentiated as its weighted sum)")
    return errs


def _finetune_errors(cfg: TrainConfig, world_size: int) -> list[str]:
    """Refusals of the fine-tuning mode and of FSDP: a negative ``model.lora_rank``; ``full_finetune_modules`` with
    a LoRA; ``trainer.fsdp`` with a LoRA (use DDP), with one process, or with ReFL (``algorithm.draft_mode=refl``)
    or RPO, whose loops would make ranks run different numbers of forwards."""
    m, t, a = cfg.model, cfg.trainer, cfg.algorithm
    errs = []
    if m.lora_rank < 0:
        errs.append(f"model.lora_rank={m.lora_rank}: > 0 trains a LoRA of that rank, 0 fine-tunes the whole "
                    "denoiser (full fine-tuning)")
    if m.lora_rank > 0 and list(m.full_finetune_modules or []):
        errs.append(f"model.full_finetune_modules={list(m.full_finetune_modules)} selects the weights of full "
                    f"fine-tuning, but model.lora_rank={m.lora_rank} trains a LoRA: set model.lora_rank=0 for full "
                    "fine-tuning or drop model.full_finetune_modules")
    if t.fsdp:
        if m.lora_rank > 0:
            errs.append("trainer.fsdp=true shards the denoiser for full fine-tuning (model.lora_rank=0); a LoRA "
                        f"(model.lora_rank={m.lora_rank}) trains with DDP: drop trainer.fsdp and launch with "
                        "configs/accelerate/ddp_8gpu.yaml or torchrun (configs/accelerate/README.md, 'Which mode for "
                        "what': the LoRA's trainable state is small, sharding it saves nothing)")
        if world_size < 2:
            errs.append("trainer.fsdp=true needs at least 2 processes (torchrun --nproc_per_node N or accelerate "
                        "launch); with one process train without it")
        if a.name == "draft" and a.draft_mode == "refl":
            errs.append("algorithm.draft_mode=refl is not wired for FSDP: every rank must run the same forwards, and "
                        "ReFL's no-gradient prefix runs to the largest stopping step of each rank's micro-batch, "
                        "which differs between ranks; use draft_mode=draft or drop trainer.fsdp")
        if a.name == "rpo":
            errs.append("algorithm.name=rpo is not wired for FSDP (every rank must run the same forwards; its pair "
                        "and validation loops are per rank): drop trainer.fsdp")
    if t.deepspeed_zero not in (0, 2):
        errs.append(f"trainer.deepspeed_zero={t.deepspeed_zero}: flowrl wires 0 (off) and 2 (ZeRO-2); for sharded "
                    "parameters (ZeRO-3-like) use trainer.fsdp=true")
    elif t.deepspeed_zero:
        if t.fsdp:
            errs.append("trainer.deepspeed_zero=2 and trainer.fsdp=true are two ways to shard the same training: "
                        "pick one")
        if m.lora_rank > 0:
            errs.append("trainer.deepspeed_zero=2 partitions the optimizer state of full fine-tuning "
                        f"(model.lora_rank=0); a LoRA (model.lora_rank={m.lora_rank}) trains with DDP: drop "
                        "trainer.deepspeed_zero (or the DeepSpeed accelerate config) and launch with "
                        "configs/accelerate/ddp_8gpu.yaml or torchrun")
        if world_size < 2:
            errs.append("trainer.deepspeed_zero=2 needs at least 2 processes (torchrun --nproc_per_node N or "
                        "accelerate launch); with one process train without it")
        if a.name == "draft" and a.draft_mode == "refl":
            errs.append("algorithm.draft_mode=refl is not wired for DeepSpeed ZeRO-2: every rank must run the same "
                        "backwards (ZeRO-2 reduces gradients in each backward); use draft_mode=draft")
        if a.name == "rpo":
            errs.append("algorithm.name=rpo is not wired for DeepSpeed ZeRO-2 (every rank must run the same "
                        "backwards): drop trainer.deepspeed_zero")
    return errs


def validate(cfg: TrainConfig, world_size: int = 1) -> Derived:
    """Check the configuration and derive per-rank batch arithmetic.

    Raises:
        ConfigError: with a message naming the keys to change.
    """
    t, s, a = cfg.trainer, cfg.sampler, cfg.algorithm
    errs = []
    dpo_offline = a.name == "dpo" and a.dpo_pairs != "online"
    if t.group_size < 2 and a.name == "dpo" and not dpo_offline:
        errs.append(f"trainer.group_size={t.group_size}: online DPO (algorithm.dpo_pairs=online) pairs the best and "
                    "the worst image of each prompt group; set trainer.group_size ≥ 2")
    elif t.group_size < 2 and not dpo_offline and a.name not in ("draft", "rpo"):  # DRaFT/ReFL/RPO need no groups
        errs.append(f"trainer.group_size={t.group_size}: group-relative advantages need at least 2 images per prompt")
    n = t.group_size * t.groups_per_epoch
    if n % world_size:
        errs.append(f"trainer.group_size × trainer.groups_per_epoch = {n} samples per epoch does not divide across "
                    f"{world_size} ranks; make it a multiple of {world_size}")
    per_rank = n // max(world_size, 1)
    if t.micro_batch <= 0 or per_rank % t.micro_batch:
        errs.append(f"each rank gets {per_rank} samples per epoch, not a multiple of trainer.micro_batch="
                    f"{t.micro_batch}; pick a micro_batch that divides {per_rank}")
    mb = per_rank // t.micro_batch if t.micro_batch > 0 else 0
    if t.optimizer_steps_per_epoch <= 0 or (mb and mb % t.optimizer_steps_per_epoch):
        errs.append(f"{mb} micro-batches per rank per epoch cannot be split into trainer.optimizer_steps_per_epoch="
                    f"{t.optimizer_steps_per_epoch} equal optimizer steps; use a divisor of {mb}")
    if cfg.data.kind is not None and cfg.data.kind not in PROMPT_KINDS:
        errs.append(f"data.kind={cfg.data.kind!r}: choose one of {list(PROMPT_KINDS)}, or null to detect it from the "
                    "prompt file")
    if s.kind not in ("sde", "cps", "dance"):
        errs.append(f"sampler.kind={s.kind!r}: choose 'sde', 'cps' or 'dance'")
    if a.name not in ("flow_grpo", "nft", "raft", "dpo", "draft", "rpo"):
        errs.append(f"algorithm.name={a.name!r}: choose 'flow_grpo', 'nft', 'raft', 'dpo', 'draft' or 'rpo'")
    if a.name == "dpo":
        if a.kl_beta > 0:
            errs.append("algorithm.name=dpo has no separate KL term (the DPO loss is itself KL-regularised, with "
                        "strength algorithm.dpo_beta): set algorithm.kl_beta=0")
        if not (isinstance(a.dpo_beta, (int, float)) and math.isfinite(a.dpo_beta) and a.dpo_beta > 0):
            errs.append(f"algorithm.dpo_beta={a.dpo_beta}: the DPO β must be finite and > 0 (e.g. 100)")
        if dpo_offline and not (a.dpo_pairs and Path(a.dpo_pairs).is_file()):
            errs.append(f"DPO without pairs: algorithm.dpo_pairs={a.dpo_pairs!r} is neither 'online' nor an existing "
                        "file; set algorithm.dpo_pairs=online (best/worst image of each rollout group) or to the path "
                        "of a JSON-lines file of {\"prompt\", \"chosen\", \"rejected\"} image pairs")
        if not dpo_offline and a.dynamic_sampling:
            errs.append("algorithm.name=dpo with dpo_pairs=online already skips groups without reward spread (they "
                        "form no pair): set algorithm.dynamic_sampling=false")
    if a.name in ("nft", "raft"):
        if a.kl_beta > 0:
            errs.append(f"algorithm.name={a.name} has no likelihood and no KL term: set algorithm.kl_beta=0 (β of "
                        "NFT is algorithm.nft_beta)")
        if a.advantage_clip is None or a.advantage_clip <= 0:
            errs.append("algorithm.name=nft maps advantages to r = clip(A/(2·A_max)+½, 0, 1) with A_max = "
                        "algorithm.advantage_clip: set it > 0 (e.g. 5)")
        if a.nft_beta <= 0 or a.nft_timesteps < 1:
            errs.append("algorithm.nft_beta must be > 0 and algorithm.nft_timesteps ≥ 1")
        if a.nft_guidance_scale < 1:
            errs.append(f"algorithm.nft_guidance_scale={a.nft_guidance_scale} must be ≥ 1 (1 = conditional velocity, "
                        "the paper's CFG-free NFT; set it to sampler.guidance_scale to train the guided policy)")
        if (a.nft_detach_uncond or a.nft_uncond_anchor) and a.nft_guidance_scale <= 1:
            errs.append("algorithm.nft_detach_uncond / nft_uncond_anchor act on the unconditional branch of the guided "
                        "velocity: set algorithm.nft_guidance_scale > 1 (e.g. to sampler.guidance_scale) or drop them")
        if a.nft_uncond_anchor < 0:
            errs.append(f"algorithm.nft_uncond_anchor={a.nft_uncond_anchor} must be ≥ 0")
    if a.name == "draft":
        errs += _draft_errors(cfg)
    if a.name == "rpo":
        from flowrl.rpo import config_errors as _rpo_errors

        errs += _rpo_errors(cfg)
    if s.noise_level <= 0 and a.name not in ("nft", "raft", "dpo", "draft", "rpo"):
        errs.append("sampler.noise_level must be > 0 for a likelihood-ratio update (0 is the ODE: no log-probability); "
                    "use it only for evaluation")
    if s.density not in ("gaussian", "squared_error") or (s.density == "squared_error" and s.kind != "cps"):
        errs.append(f"sampler.density={s.density!r}: 'gaussian', or 'squared_error' with sampler.kind=cps only")
    if s.train_steps < 2:
        errs.append("sampler.train_steps must be at least 2")
    if s.eval_steps < s.train_steps:
        errs.append(f"sampler.eval_steps={s.eval_steps} < sampler.train_steps={s.train_steps}: evaluation should use "
                    "at least as many ODE steps as training (denoising reduction trains with fewer)")
    if not 0 < s.timestep_fraction <= 1:
        errs.append("sampler.timestep_fraction must be in (0, 1]")
    if s.mixgrpo_window:
        if s.sde_window:
            errs.append("sampler.mixgrpo_window and sampler.sde_window are two window schedules: set one to 0")
        if not 1 <= s.mixgrpo_window <= s.train_steps - 2 or s.mixgrpo_shift_interval < 1 or s.mixgrpo_stride < 0:
            errs.append(f"sampler.mixgrpo_window={s.mixgrpo_window} must be in [1, train_steps - 2 = "
                        f"{s.train_steps - 2}] with mixgrpo_shift_interval ≥ 1 and mixgrpo_stride ≥ 0")
    if s.ddim_eta >= 0:
        if cfg.model.family != "unet" or s.kind != "cps":
            errs.append(f"sampler.ddim_eta={s.ddim_eta} is DDIM-η for UNet (DDPM-family) models: it needs "
                        "model.family=unet and sampler.kind=cps (set sampler.ddim_eta=-1 otherwise)")
        if s.ddim_eta > 1:
            errs.append(f"sampler.ddim_eta={s.ddim_eta} must be ≤ 1 (1 = the DDPM posterior, DDPO's policy)")
    if s.sde_window:
        hi = s.window_start_max if s.window_start_max >= 0 else s.train_steps // 2
        if s.sde_window < 0 or s.window_start_min < 0 or hi <= s.window_start_min or hi - 1 + s.sde_window > s.train_steps - 1:
            errs.append(f"SDE window of {s.sde_window} steps starting in [{s.window_start_min}, {hi}) does not fit in "
                        f"the {s.train_steps - 1} trainable steps; shrink sampler.sde_window or the start range")
    n_trainable = max(1, int(s.train_steps * s.timestep_fraction)) if 0 < s.timestep_fraction <= 1 else 0
    if s.sde_window > 0:
        n_trainable = min(n_trainable, s.sde_window)
    if s.steps_per_sample < 0 or s.steps_per_sample > n_trainable:
        errs.append(f"sampler.steps_per_sample={s.steps_per_sample}: must be 0 (train every trainable step) or at "
                    f"most the {n_trainable} trainable steps per sample (train_steps × timestep_fraction"
                    f"{', SDE window' if s.sde_window > 0 else ''})")
    if a.kl_beta < 0:
        errs.append("algorithm.kl_beta must be ≥ 0")
    if a.kl_std not in ("transition", "reference"):
        errs.append("algorithm.kl_std must be 'transition' or 'reference'")
    if a.clip_range <= 0 and a.policy_loss == "ppo_clip":
        errs.append("algorithm.clip_range must be > 0 for ppo_clip")
    if a.loss_aggregation not in ("step_mean", "seq_mean_step_mean"):
        errs.append(f"algorithm.loss_aggregation={a.loss_aggregation!r}: choose 'step_mean' or 'seq_mean_step_mean'")
    if cfg.reward.aggregation not in ("weighted_sum", "gdpo"):
        errs.append(f"reward.aggregation={cfg.reward.aggregation!r}: choose 'weighted_sum' or 'gdpo'")
    if cfg.reward.aggregation == "gdpo" and cfg.reward.name != "multi":
        errs.append("reward.aggregation=gdpo normalises each reward component separately: use reward=multi with "
                    "reward.args.components={name: weight, ...}")
    if a.dynamic_sampling_max_rounds < 1:
        errs.append("algorithm.dynamic_sampling_max_rounds must be ≥ 1")
    if a.policy_loss in ("gspo", "gmpo") and a.loss_aggregation != "seq_mean_step_mean":
        errs.append(f"algorithm.policy_loss={a.policy_loss} has a trajectory-level ratio whose loss is defined per "
                    "trajectory: set algorithm.loss_aggregation=seq_mean_step_mean")
    if a.policy_loss == "grpo_guard" and (a.inner_epochs > 1 or t.optimizer_steps_per_epoch > 1):
        errs.append("algorithm.policy_loss=grpo_guard is wired for on-policy updates (its re-centring needs the "
                    "rollout's Gaussian means): set algorithm.inner_epochs=1 and trainer.optimizer_steps_per_epoch=1")
    if a.inner_epochs < 1:
        errs.append("algorithm.inner_epochs must be ≥ 1")
    from flowrl.core import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    if a.advantage not in ADVANTAGE_ESTIMATORS:
        errs.append(f"algorithm.advantage={a.advantage!r}: choose from {sorted(ADVANTAGE_ESTIMATORS)}")
    if a.policy_loss not in POLICY_LOSSES:
        errs.append(f"algorithm.policy_loss={a.policy_loss!r}: choose from {sorted(POLICY_LOSSES)}")
    if cfg.model.family not in ("sd3", "flux", "sana", "unet"):
        errs.append(f"model.family={cfg.model.family!r}: choose 'sd3' (SD3/SD3.5), 'flux' (FLUX.1), 'sana' (SANA) "
                    "or 'unet' (SD1.x/2.x ε/v-prediction UNets, DDPO)")
    if cfg.model.family == "flux" and not cfg.model.load_t5:
        errs.append("model.family=flux needs its T5 encoder: set model.load_t5=true")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        errs.append(f"trainer.mixed_precision={t.mixed_precision!r}: choose no, fp16 or bf16")
    if cfg.model.dtype not in ("float32", "float16", "bfloat16"):
        errs.append("model.dtype must be float32, float16 or bfloat16")
    errs += _finetune_errors(cfg, world_size)
    if errs:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errs))
    return Derived(samples_per_epoch=n, samples_per_rank=per_rank, micro_batches_per_rank=mb,
                   micro_batches_per_opt_step=mb // t.optimizer_steps_per_epoch)
