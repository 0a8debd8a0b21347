"""The Flow-GRPO training loop, model-agnostic: rollout → reward → advantages → per-step PPO update → EMA/eval.

One epoch (Flow-GRPO, arXiv 2505.05470, Alg. 1; recipe in ``shared/REFERENCE.md`` §3):

1. Sample ``groups_per_epoch`` prompts (the same list on every rank, from ``seed`` and the epoch) and ``group_size``
   images per prompt; the flat list of samples is split across ranks, so a group may span ranks. Sample ``i`` of the
   epoch draws its initial noise and its SDE noise from its own generator seeded by ``(seed, epoch, i)``, so the data
   do not depend on the number of ranks or the micro-batch size.
2. Roll out with the SDE/CPS sampler (CFG as one batched forward, prompt embeddings encoded once per group), decode,
   score with the reward; gather rewards of all ranks; advantages per group (or with the global std), clamped.
   Optional dynamic sampling (DAPO): groups without reward spread are dropped and further rounds of fresh groups
   are rolled out until ``groups_per_epoch`` informative groups are collected.
3. For each micro-batch and each trained step: recompute the step's log-probability with gradients (same batch as
   the rollout, so the first ratio is exactly 1), PPO-clip loss on the per-step ratio plus β·KL to the reference
   (the same transformer with LoRA disabled, closed-form Gaussian KL), summed and divided by the global number of
   trained (sample, step) pairs of the optimizer step; gradients of the LoRA are all-reduced across ranks.
4. EMA of the LoRA weights (used for evaluation), logging, image grids, checkpoints.

``model.lora_rank=0`` trains the whole denoiser instead of a LoRA (float32 master weights; the reference is then a
frozen copy of the initial denoiser, kept only when the update needs it); ``trainer.fsdp=true`` (or an ``accelerate
launch`` FSDP config) shards it with FSDP2 (:mod:`flowrl.fsdp`): gradients are reduce-scattered instead of
all-reduced, every rank runs the same forwards (padding forwards with zero loss where a rank has fewer samples or
trained steps, evaluation on every rank) and checkpoints gather the full weights on rank 0. ``trainer.deepspeed_zero=2``
(or an ``accelerate launch`` DeepSpeed config) partitions its optimizer state and gradients with DeepSpeed ZeRO-2
(:mod:`flowrl.deepspeed_zero`; same lock-step, the engine clips and steps, each rank saves its optimizer partition).

Other update rules share steps 1, 2 and 4: ``algorithm.name=nft`` (DiffusionNFT, :meth:`Trainer.update_nft`; ``raft``
is its positive-only special case, reward-ranked fine-tuning) and
``algorithm.name=dpo`` (Flow-DPO, :meth:`Trainer.update_dpo`), the latter on online best/worst pairs of the rollout
groups or on an offline pairs file (then no rollout and no reward during training).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flowrl.config import ConfigError, Derived, TrainConfig, validate
from flowrl.core import POLICY_LOSSES, SEQUENCE_LOSSES, aggregate_loss, compute_advantages, informative_groups, select_groups
from flowrl.core.dpo import best_worst_pairs, diffusion_dpo_loss, dpo_noisy_pair, read_preference_pairs
from flowrl.core.multi_reward import gdpo_advantages
from flowrl.eval_report import paired_difference, read_results, render_paired_markdown
from flowrl.evaluation import evaluate, group_diversity, markdown_table, save_grid, to_uint8
from flowrl.flow.rollout import Trajectory, sample_trajectory, step_fn
from flowrl.flow.samplers import mixgrpo_train_steps
from flowrl.flow.sde import kl_gaussian_means
from flowrl.prompt_sets import load_prompt_set
from flowrl.rewards import check_reward_output, load_reward
from flowrl.runtime import open_run_dir, reduce_and_clip

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EMA:
    """Exponential moving average of parameters (Flow-GRPO: decay 0.9, updated every 8 optimizer steps), with the
    usual warm-up ``decay_k = min(decay, (1 + k) / (10 + k))`` at the k-th update."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int):
        self.params, self.decay, self.every = params, decay, max(1, every)
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def step(self, optimizer_step: int) -> None:
        if optimizer_step % self.every:
            return
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)
        self.updates += 1

    def swapped(self):
        """Context manager: the EMA weights are in the model inside the block, the live weights are restored after."""
        ema = self

        class _Swap:
            def __enter__(self_inner):
                self_inner.backup = [p.detach().clone() for p in ema.params]
                with torch.no_grad():
                    for p, s in zip(ema.params, ema.shadow):
                        p.copy_(s)

            def __exit__(self_inner, *exc):
                with torch.no_grad():
                    for p, b in zip(ema.params, self_inner.backup):
                        p.copy_(b)
                return False

        return _Swap()


@dataclass
class EpochBatch:
    """This rank's share of an epoch: prompts, metadata, group ids and global sample indices (each length n)."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: torch.Tensor
    sample_ids: list[int]
    noise_levels: torch.Tensor  # [n, T]
    train_mask: torch.Tensor  # [n, T]


def train_step_mask(num_steps: int, timestep_fraction: float) -> torch.Tensor:
    """``[T]`` bool: the first ``floor(T·fraction)`` steps are trainable (Flow-GRPO's ``timestep_fraction``; 0.99 of
    10 steps trains 9 and leaves out the last, tiny-std step)."""
    k = max(1, int(num_steps * timestep_fraction))
    return torch.arange(num_steps) < k


def autocast_velocity(velocity, device_type: str, dtype: torch.dtype):
    """Wrap an adapter's ``velocity(x, σ, cond, g)`` so that its transformer runs under ``torch.autocast(device_type,
    dtype)`` (``trainer.mixed_precision``: matmuls in bf16/fp16, trainable LoRA weights and optimizer state stay
    fp32) and its output is float32, so the sampler steps, log-probs, ratios and losses are computed in fp32."""
    import functools

    @functools.wraps(velocity)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = velocity(*args, **kwargs)
        return out.float()

    return wrapped


GROUP_SEED_OFFSET = 1 << 40  # seeds of per-group initial noise live far from per-sample seeds
NFT_SEED_OFFSET = 1 << 41  # seeds of DiffusionNFT's forward-process draws
DPO_SEED_OFFSET = 1 << 42  # seeds of Flow-DPO's forward-process draws (one generator per pair)
DPO_SHUFFLE_TAG = 0x44504F  # tags the random stream of the offline pair order ("DPO")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of sample ``index`` of ``epoch``: independent of ranks and micro-batching."""
    return (seed * 1_000_000_007 + epoch * 1_000_003 + index) % (2**63 - 1)


def forward_process_draws(generator: torch.Generator, k: int, shape: tuple[int, ...], shift: float = 3.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` forward-process draws for one clean latent: ``σ`` ``[k]`` and noise ``ε`` ``[k, *shape]`` (float32).

    ``σ = shift·u / (1 + (shift-1)·u)`` with ``u = sigmoid(n)``, ``n ~ N(0, 1)``: SD3's logit-normal training
    density (Esser et al. 2024, arXiv 2403.03206, §3.1, m=0, s=1) pushed through the scheduler's time shift (3 for
    SD3), so σ lies in (0, 1) with more mass at high noise, as the model was pretrained. All σ are drawn before the
    noise, so the draws depend only on the generator's seed.
    """
    u = torch.sigmoid(torch.randn(k, generator=generator))
    sig = shift * u / (1 + (shift - 1.0) * u)
    eps = torch.randn((k, *shape), generator=generator)
    return sig, eps


def pair_draws(seed: int, epoch: int, offset: int, keys, k: int, shape: tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward-process draws of preference pairs (Flow-DPO, RPO): for pair ``i`` a generator seeded by
    ``(seed, epoch, offset + keys[i])`` gives ``k`` logit-normal σ and ``k`` noises (:func:`forward_process_draws`),
    one per inner epoch, shared by both sides of the pair; rank- and micro-batch-independent.

    Returns:
        ``σ [P, k]`` in (0, 1) and ``ε [P, k, *shape]``.
    """
    sig_all, eps_all = torch.zeros(len(keys), k), torch.zeros(len(keys), k, *shape)
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, offset + int(key)))
        sig_all[i], eps_all[i] = forward_process_draws(g, k, shape)
    return sig_all, eps_all


def offline_pair_order(seed: int, epoch: int, pairs_per_epoch: int, n_pairs: int) -> list[int]:
    """Indices into an offline pairs file of the ``pairs_per_epoch`` pairs trained at ``epoch``.

    The file is read as a stream of passes, each a fresh permutation seeded by ``(seed, pass)``; epoch ``e`` takes
    stream positions ``[e·P, (e+1)·P)``. The order depends only on the seed and the epoch (exact resume, any number
    of ranks), and every pair is seen once per pass.
    """
    perms: dict[int, np.ndarray] = {}
    out = []
    for q in range(epoch * pairs_per_epoch, (epoch + 1) * pairs_per_epoch):
        k = q // n_pairs
        if k not in perms:
            perms[k] = np.random.default_rng([seed, DPO_SHUFFLE_TAG, k]).permutation(n_pairs)
        out.append(int(perms[k][q % n_pairs]))
    return out


def load_image(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """An image file as ``[3, resolution, resolution]`` float32 in [0, 1]: RGB, centre-cropped to a square, then
    resized (bicubic) when its side differs from ``resolution``.

    Raises:
        FileNotFoundError / PIL.UnidentifiedImageError: missing or unreadable file.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != resolution:
            im = im.resize((resolution, resolution), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def make_epoch(cfg: TrainConfig, train_md: list[dict], epoch: int, rank: int, world: int,
               round_: int = 0, step_levels: torch.Tensor | None = None) -> EpochBatch:
    """Draw the epoch's prompt groups (identical on every rank) and return this rank's slice.

    ``step_levels`` (``[train_steps]``) replaces the constant ``sampler.noise_level`` per step (DDIM-η levels of the
    UNet family). With ``sampler.mixgrpo_window`` only MixGRPO's window of the epoch is stochastic and trainable.

    ``round_ > 0`` draws a further, independent set of ``groups_per_epoch`` groups for dynamic sampling; its group
    ids and sample ids continue after those of the earlier rounds (ids are unique within the epoch).
    """
    t, s = cfg.trainer, cfg.sampler
    rng = np.random.default_rng([cfg.trainer.seed, epoch] if round_ == 0 else [cfg.trainer.seed, epoch, round_])
    replace = t.groups_per_epoch > len(train_md)
    p = None
    if cfg.data.balance_tags:
        tags = [m.get("tag", "") for m in train_md]
        counts = {tg: tags.count(tg) for tg in set(tags)}
        p = np.array([1.0 / (counts[tg] * len(counts)) for tg in tags])
        p /= p.sum()
        replace = replace or bool((p * t.groups_per_epoch > 1).any())
    chosen = rng.choice(len(train_md), size=t.groups_per_epoch, replace=replace, p=p)
    n_steps = s.train_steps
    base_mask = train_step_mask(n_steps, s.timestep_fraction)
    levels = torch.full((t.groups_per_epoch, n_steps), float(s.noise_level))
    if step_levels is not None:
        levels = step_levels.float()[None].expand(t.groups_per_epoch, n_steps).clone()
    if s.mixgrpo_window:
        win = torch.zeros(n_steps, dtype=torch.bool)
        # full windows inside the trainable steps 0..N-2 (the last step, to σ = 0, is deterministic-ish and untrained)
        win[mixgrpo_train_steps(epoch, n_steps, s.mixgrpo_window, s.mixgrpo_shift_interval,
                                stride=s.mixgrpo_stride, roll_back=s.mixgrpo_roll_back,
                                max_start=n_steps - 1 - s.mixgrpo_window, upstream_truncation=False)] = True
        levels = levels * win
    if s.sde_window:
        hi = s.window_start_max if s.window_start_max >= 0 else n_steps // 2
        starts = rng.integers(s.window_start_min, hi, size=t.groups_per_epoch)
        steps = torch.arange(n_steps)
        win = (steps[None] >= torch.as_tensor(starts)[:, None]) & (steps[None] < torch.as_tensor(starts)[:, None] + s.sde_window)
        levels = levels * win
    g = t.group_size
    n = g * t.groups_per_epoch
    per_rank = n // world
    idx = list(range(rank * per_rank, (rank + 1) * per_rank))
    gid = [i // g for i in idx]
    lv = levels[gid]
    mask = base_mask[None].expand_as(lv) & (lv > 0)
    if s.steps_per_sample > 0:
        # A random subset per sample, drawn for all n samples so that every rank sees the same draw.
        full = base_mask[None].expand(n, n_steps) & (levels[torch.arange(n) // g] > 0)
        keys = torch.as_tensor(rng.random((n, n_steps)), dtype=torch.float32).masked_fill(~full, 2.0)
        order = keys.argsort(1).argsort(1)
        mask = (full & (order < s.steps_per_sample))[idx]
    return EpochBatch(prompts=[train_md[chosen[k]]["prompt"] for k in gid],
                      metadata=[train_md[chosen[k]] for k in gid],
                      group_ids=torch.tensor(gid) + round_ * t.groups_per_epoch,
                      sample_ids=[i + round_ * n for i in idx], noise_levels=lv,
                      train_mask=mask)


# The progress bar's figures per update rule: (label, logged key, format); the reward mean comes first when logged.
PROGRESS_KEYS = {
    "policy_gradient": (("kl", "train/kl", "{:.2e}"), ("clip", "train/clipfrac", "{:.2f}")),
    "nft": (("loss", "train/nft_loss", "{:.4f}"),),
    "raft": (("loss", "train/nft_loss", "{:.4f}"),),
    "dpo": (("dpo", "train/dpo_loss", "{:.4f}"), ("acc", "train/dpo_implicit_acc", "{:.2f}")),
    "draft": (("loss", "train/draft_loss", "{:.4f}"),),
    "rpo": (("loss", "train/rpo_loss", "{:.4f}"), ("acc", "train/rpo_implicit_acc", "{:.2f}"),
            ("harmonic", "rpo/harmonic", "{:.3f}")),
}


def progress_postfix(algorithm: str, log: dict[str, float]) -> dict[str, str]:
    """The progress-bar figures of an epoch's ``log`` for ``algorithm.name``: the reward mean, then the figures that
    update rule produces (KL and clip fraction for the likelihood-ratio rules, the loss for the others); keys the
    epoch did not log are left out."""
    post = {"reward": f"{log['reward/mean']:.3f}"} if "reward/mean" in log else {}
    for label, key, fmt in PROGRESS_KEYS.get(algorithm, PROGRESS_KEYS["policy_gradient"]):
        if key in log:
            post[label] = fmt.format(log[key])
    return post


class Trainer:
    """Flow-GRPO trainer over a model adapter (see :mod:`flowrl.models`). Construct, then :meth:`run`.

    Raises (at construction, before any work):
        flowrl.config.ConfigError: impossible batch arithmetic or a refused combination.
        FileNotFoundError / ValueError: missing model path, missing or malformed prompt files.
        KeyError: unknown reward name.
    """

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.cfg = cfg
        t = cfg.trainer
        # Mixed precision is applied by the trainer itself (autocast around every transformer forward, see
        # autocast_velocity), since it never hands the model to accelerator.prepare.
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        # `accelerate launch` exports OMP_NUM_THREADS=1; on CPU give each local rank its share of the cores instead.
        if t.threads:
            torch.set_num_threads(t.threads)
        elif self.acc.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.acc.num_processes))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        fsdp_plugin = None
        if self.acc.distributed_type == DistributedType.FSDP:  # `accelerate launch` with an fsdp_* config (GPUs)
            t.fsdp, fsdp_plugin = True, self.acc.state.fsdp_plugin
        from flowrl.deepspeed_zero import stage_from_accelerate

        t.deepspeed_zero = stage_from_accelerate(self.acc) or t.deepspeed_zero  # `accelerate launch` DeepSpeed config
        self.derived: Derived = validate(cfg, self.acc.num_processes)
        if t.deepspeed_zero:  # fail at start-up, before loading anything, when DeepSpeed is not installed
            from flowrl.deepspeed_zero import require_deepspeed

            require_deepspeed()
        # GenEval metadata, OCR prompts (quoted text → record "text") or plain lists; records keep every field
        self.train_md = load_prompt_set(cfg.data.train, cfg.data.kind).records
        self.test_md = load_prompt_set(cfg.data.test, cfg.data.kind).records
        self.reward_fn = load_reward(cfg.reward.name, **dict(cfg.reward.args))
        # GDPO: the per-component reward columns whose advantages are normalised separately
        self._components = list(self.reward_fn.weights) if cfg.reward.aggregation == "gdpo" else []
        self.out = Path(t.output_dir)
        # Flow-DPO on an offline pairs file: read (and check every image exists) before loading the model
        self.dpo_pairs = None
        if cfg.algorithm.name == "dpo" and cfg.algorithm.dpo_pairs != "online":
            self.dpo_pairs = read_preference_pairs(cfg.algorithm.dpo_pairs, check_files=True)
        self.adapter = self._load_adapter()
        if self.dpo_pairs is not None and not hasattr(self.adapter, "encode_images"):
            raise ConfigError(f"offline DPO (algorithm.dpo_pairs={cfg.algorithm.dpo_pairs}) encodes the pair images "
                              f"with the model's VAE, which the {type(self.adapter).__name__} adapter cannot do yet "
                              "(no encode_images); use model.family=sd3 or algorithm.dpo_pairs=online")
        # model.lora_rank=0: full fine-tuning of the denoiser (fp32 master weights); the frozen reference copy is kept
        # only when something calls adapter.reference() (flowrl.models.sd3.unfreeze_full)
        self.full_ft = cfg.model.lora_rank == 0
        if self.full_ft:
            self.params = self.adapter.add_full_finetune(list(cfg.model.full_finetune_modules),
                                                         keep_reference=self.needs_reference(cfg))
        else:
            self.params = self.adapter.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha,
                                                list(cfg.model.lora_targets), init_seed=t.seed)
            for p in self.params:
                p.data = p.data.float()
        if cfg.model.gradient_checkpointing:
            self.adapter.transformer.enable_gradient_checkpointing()
        self.fsdp = bool(t.fsdp)  # FSDP2 shards of the denoiser (and of its reference copy): flowrl/fsdp.py
        if self.fsdp:
            self._shard(fsdp_plugin)
        self.opt = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
        # DeepSpeed ZeRO-2 (flowrl/deepspeed_zero.py): the engine's ZeRO optimizer wraps the AdamW above and owns the
        # partitioned moments and gradients; the denoiser keeps its whole weights, the adapters call it as before
        self.ds = None
        if t.deepspeed_zero:
            from flowrl.deepspeed_zero import ds_config, initialize

            self.ds = initialize(self.adapter.transformer, self.opt,
                                 ds_config(t.deepspeed_zero, t.grad_clip, t.micro_batch, self.acc.num_processes))
            self.opt = self.ds.optimizer
            if self.acc.is_main_process:
                print(f"DeepSpeed ZeRO-{t.deepspeed_zero}: optimizer state and gradients of "
                      f"{type(self.adapter.transformer).__name__} partitioned over {self.acc.num_processes} ranks",
                      flush=True)
        # every rank runs the same forwards and backwards (FSDP: collectives in both; ZeRO-2: in the backwards)
        self.lockstep = self.fsdp or self.ds is not None
        self.ema = EMA(self.params, t.ema_decay, t.ema_every) if t.ema else None
        if t.mixed_precision in ("fp16", "bf16"):  # every transformer forward (rollout, update, evaluation) autocasts
            self.adapter.velocity = autocast_velocity(self.adapter.velocity, self.acc.device.type,
                                                      torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16)
        self.sigmas = self.adapter.sigmas(cfg.sampler.train_steps)
        # DDIM-η rollouts (UNet family): per-step CPS levels whose std equals DDIM's σ_t(η)
        self.step_levels = (self.adapter.ddim_noise_levels(cfg.sampler.ddim_eta, cfg.sampler.train_steps)
                            if cfg.sampler.ddim_eta >= 0 else None)
        self.step_fn = step_fn(cfg.sampler.kind, float(self.sigmas[1]), cfg.sampler.density)
        self.policy_loss = POLICY_LOSSES[cfg.algorithm.policy_loss]
        self.opt_steps = 0
        self.grad_norms: list[float] = []  # pre-clip gradient norms of the current epoch's optimizer steps
        self.epoch = 0  # the epoch being trained (names fault checkpoints)
        self.tag_names = sorted({str(m.get("tag", "")) for m in self.train_md})
        self.history: list[dict] = []
        self.draft = None  # algorithm=draft: DRaFT-K / ReFL on a differentiable reward (flowrl/draft.py)
        if cfg.algorithm.name == "draft":
            from flowrl.draft import DraftUpdater

            self.draft = DraftUpdater(self)
        self.rpo = None  # algorithm=rpo: subject-driven RPO against reference images (flowrl/rpo.py)
        if cfg.algorithm.name == "rpo":
            from flowrl.rpo import RPOUpdater

            self.rpo = RPOUpdater(self)
        self.writer = None
        if self.acc.is_main_process:
            self.writer = open_run_dir(self.out, asdict(cfg))

    @staticmethod
    def needs_reference(cfg: TrainConfig) -> bool:
        """Whether the update calls ``adapter.reference()`` (the reference policy): the KL term
        (``algorithm.kl_beta > 0``), Flow-DPO (always) or NFT's unconditional anchor (``nft_uncond_anchor > 0``).
        Under full fine-tuning the frozen copy of the initial denoiser is kept only then."""
        a = cfg.algorithm
        return a.kl_beta > 0 or a.nft_uncond_anchor > 0 or a.name in ("dpo", "rpo")

    def _shard(self, plugin) -> None:
        """FSDP2: shard the frozen reference copy (if kept) and the trained denoiser
        (:func:`flowrl.fsdp.shard_denoiser`, settings from accelerate's FSDP plugin when launched with one), then
        collect the trainable parameters (now ``DTensor`` shards) for the optimizer and the EMA.

        Raises:
            ConfigError: a sharding strategy or CPU offload that flowrl does not wire.
        """
        from flowrl.fsdp import default_wrap_classes, settings_from_plugin, shard_denoiser

        mp = self.cfg.trainer.mixed_precision
        try:
            settings = settings_from_plugin(plugin, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        ref = getattr(self.adapter, "_frozen_reference", None)
        if ref is not None:  # frozen, in model.dtype, sharded like the model (it is as large) and computed in the
            shard_denoiser(ref, settings)  # same param_dtype, so that policy = reference exactly before the first step
        classes = settings.wrap_classes or default_wrap_classes(self.adapter.transformer)
        den = shard_denoiser(self.adapter.transformer, settings)
        self.params = [p for p in den.parameters() if p.requires_grad]
        if self.acc.is_main_process:
            units = sum(1 for m in den.modules() if m is not den and type(m).__name__.startswith("FSDP"))
            print(f"FSDP2: {type(den).__name__} sharded over {self.acc.num_processes} ranks ({units} units of "
                  f"{classes} + root; reshard_after_forward="
                  f"{settings.reshard_after_forward}){'; reference copy sharded too' if ref is not None else ''}",
                  flush=True)

    def _load_adapter(self):
        """The model adapter of ``model.family``: :class:`~flowrl.models.sd3.SD3Adapter` (``sd3``) or
        :class:`~flowrl.models.flux.FluxAdapter` (``flux``; its σ grid depends on ``model.resolution``),
        :class:`~flowrl.models.sana.SanaAdapter` (``sana``) or :class:`~flowrl.models.unet.UNetAdapter` (``unet``)."""
        m = self.cfg.model
        kw = dict(dtype=DTYPES[m.dtype], device=self.acc.device, max_sequence_length=m.max_sequence_length,
                  load_t5=m.load_t5)
        if m.family == "flux":
            from flowrl.models.flux import FluxAdapter

            return FluxAdapter.from_pretrained(m.pretrained, resolution=m.resolution, **kw)
        if m.family == "sana":  # SANA 0.6B/1.6B (Gemma-2 text, DC-AE); sampled with the equivalent Euler scheduler
            from flowrl.models.sana import SanaAdapter

            return SanaAdapter.from_pretrained(m.pretrained, **kw)
        if m.family == "unet":  # SD1.x/2.x ε/v-prediction UNets (DDPO), exposed in the flow-matching frame
            from flowrl.models.unet import UNetAdapter

            return UNetAdapter.from_pretrained(m.pretrained, **kw)
        from flowrl.models.sd3 import SD3Adapter

        return SD3Adapter.from_pretrained(m.pretrained, **kw)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, eb: EpochBatch, epoch: int) -> tuple[Trajectory, object, dict[str, np.ndarray], np.ndarray]:
        """Sample this rank's trajectories in micro-batches; returns the trajectories ``[n, ...]``, their prompt
        embeddings ``[n, ...]``, reward columns ``{name: [n]}`` and the decoded uint8 images ``[n, H, W, 3]``."""
        cfg, mb = self.cfg, self.cfg.trainer.micro_batch
        res = cfg.model.resolution
        trajs, conds, images, cols = [], [], [], []
        cache: dict[str, object] = {}
        for j in range(0, len(eb.prompts), mb):
            prompts = eb.prompts[j : j + mb]
            uniq = [p for p in dict.fromkeys(prompts) if p not in cache]
            if uniq:  # encode each prompt once per epoch; a group shares its embedding
                enc = self.adapter.encode(uniq)
                cache.update({p: enc[k : k + 1] for k, p in enumerate(uniq)})
            cond = type(cache[prompts[0]]).cat([cache[p] for p in prompts])
            gens = [torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, epoch, i))
                    for i in eb.sample_ids[j : j + mb]]
            self.adapter.sigmas(cfg.sampler.train_steps)  # the UNet family scales x_T by its grid's first step
            if cfg.sampler.shared_initial_noise:  # one x_T per group: reward spread comes from the SDE steps only
                x = self.adapter.initial_noise(
                    [torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, epoch, GROUP_SEED_OFFSET + int(g)))
                     for g in eb.group_ids[j : j + mb]], res, res)
            else:
                x = self.adapter.initial_noise(gens, res, res)
            traj = sample_trajectory(
                lambda z, s: self.adapter.velocity(z, s, cond, cfg.sampler.guidance_scale), x, self.sigmas,
                eb.noise_levels[j : j + mb], kind=cfg.sampler.kind, generators=gens,
                train_mask=eb.train_mask[j : j + mb], density=cfg.sampler.density)
            imgs = to_uint8(self.adapter.decode(traj.final))
            out = check_reward_output(self.reward_fn(imgs, prompts, eb.metadata[j : j + mb]), len(imgs),
                                      cfg.reward.name)
            trajs.append(traj)
            conds.append(cond)
            images.append(imgs)
            cols.append(out)
        rewards = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
        return Trajectory.cat(trajs), type(conds[0]).cat(conds), rewards, np.concatenate(images)

    def collect(self, epoch: int) -> dict:
        """Roll out and score one epoch's groups; with ``algorithm.dynamic_sampling`` keep only groups with reward
        spread, rolling out further rounds of fresh groups until ``groups_per_epoch`` of them are collected (at most
        ``dynamic_sampling_max_rounds`` rounds; the first ones in order are kept).

        Returns:
            ``traj``/``cond``/``adv``: this rank's training batch; ``cols``: reward columns of every sample this rank
            rolled out; ``images``: round-0 images; ``rewards_all``: rewards of all ranks and rounds (rank-major
            order) and ``group_ids_all`` their group ids;
            ``informative_frac``: share of round-0 groups with reward spread; ``groups``: groups trained on;
            ``rounds``: rounds rolled out; ``diversity``: within-group image diversity of this rank's round-0 images
            (:func:`~flowrl.evaluation.group_diversity`).

        Raises:
            RuntimeError: a NaN/inf reward (after saving a checkpoint and the offending images).
        """
        cfg, a = self.cfg, self.cfg.algorithm
        rank, world = self.acc.process_index, self.acc.num_processes
        rounds = a.dynamic_sampling_max_rounds if a.dynamic_sampling else 1
        trajs, conds, cols, r_glob, g_glob, local_pos, sids, tags = [], [], [], [], [], [], [], []
        comp_glob: dict[str, list[torch.Tensor]] = {}
        images, offset, informative_frac, diversity = None, 0, 0.0, 0.0
        for rnd in range(rounds):
            eb = make_epoch(cfg, self.train_md, epoch, rank, world, rnd, self.step_levels)
            try:
                traj, cond, c, imgs = self.rollout(eb, epoch)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # a reward (or server) that raises/times out: keep the work, say how to resume
                path = self.save(f"error_epoch_{epoch:04d}", epoch - 1, self.history)
                raise RuntimeError(
                    f"rollout/reward failed at epoch {epoch}: {type(e).__name__}: {e}\nTraining stopped; the LoRA, "
                    f"optimizer and EMA of the last completed epoch were saved to {path}. Fix the cause and continue "
                    f"with trainer.resume={path}") from e
            rewards = c["reward"]
            bad = ~np.isfinite(rewards)
            r_all = self._gather(torch.as_tensor(rewards, dtype=torch.float32))
            if bad.any() or not torch.isfinite(r_all).all():
                path = self.save(f"nan_reward_epoch_{epoch:04d}", epoch - 1, self.history)
                if self.acc.is_main_process:
                    save_grid(imgs, self.out / "nan_reward_images.png")
                prompts = sorted({eb.prompts[i] for i in np.flatnonzero(bad)})
                raise RuntimeError(
                    f"reward {cfg.reward.name!r} returned NaN/inf at epoch {epoch} for prompts {prompts[:5]}; "
                    f"training stopped. The LoRA and optimizer state were saved to {path} and the images to "
                    f"{self.out / 'nan_reward_images.png'}; fix the reward and resume from there.")
            g_all = self._gather(eb.group_ids)
            for k in self._components:
                comp_glob.setdefault(k, []).append(self._gather(torch.as_tensor(c[k], dtype=torch.float32)))
            n = len(eb.prompts)
            local_pos.append(torch.arange(offset + rank * n, offset + (rank + 1) * n))
            offset += len(r_all)
            trajs.append(traj)
            conds.append(cond)
            sids += list(eb.sample_ids)
            tags += [m.get("tag", "") for m in eb.metadata]
            cols.append(c)
            r_glob.append(r_all)
            g_glob.append(g_all)
            if images is None:
                images = imgs
                diversity = group_diversity(imgs, eb.group_ids.numpy())
                informative_frac = float(torch.unique(g_all[self._informative(r_all, g_all, comp_glob, 0)]).numel()
                                         / torch.unique(g_all).numel())
            if a.dynamic_sampling:
                r_cat, g_cat = torch.cat(r_glob), torch.cat(g_glob)
                kept = self._informative(r_cat, g_cat, comp_glob)
                if torch.unique(g_cat[kept]).numel() >= cfg.trainer.groups_per_epoch:
                    break
        r_cat, g_cat = torch.cat(r_glob), torch.cat(g_glob)
        comps = {k: torch.cat(v) for k, v in comp_glob.items()}
        if a.dynamic_sampling:
            sel = select_groups(self._informative(r_cat, g_cat, comp_glob), g_cat, cfg.trainer.groups_per_epoch)
        else:
            sel = torch.ones(len(r_cat), dtype=torch.bool)
        adv = torch.zeros(len(r_cat))
        if sel.any() and comps:
            adv[sel] = gdpo_advantages({k: v[sel] for k, v in comps.items()}, self.reward_fn.weights, g_cat[sel],
                                       a.advantage, a.advantage_eps, a.advantage_clip)
        elif sel.any():
            adv[sel] = compute_advantages(r_cat[sel], g_cat[sel], a.advantage, a.advantage_eps, a.advantage_clip)
        pos = torch.cat(local_pos)
        keep = sel[pos]
        traj = Trajectory.cat(trajs).select(keep)
        cond = type(conds[0]).cat(conds)[keep]
        return {"traj": traj, "cond": cond, "adv": adv[pos][keep],
                "sample_ids": [i for i, k in zip(sids, keep.tolist()) if k],
                "cols": {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}, "images": images,
                "rewards_all": r_cat, "group_ids_all": g_cat, "informative_frac": informative_frac,
                "diversity": diversity, "tags": tags,
                "groups": int(torch.unique(g_cat[sel]).numel()), "rounds": len(r_glob)}

    def _informative(self, rewards: torch.Tensor, group_ids: torch.Tensor, comp_glob: dict, last: int | None = None):
        """``[N]`` bool: the group has spread in its reward (or, with GDPO, in any reward component); ``last``
        restricts the components to one round (round 0 for the logged share)."""
        keep = informative_groups(rewards, group_ids)
        for parts in comp_glob.values():
            c = parts[last] if last is not None else torch.cat(parts)
            keep |= informative_groups(c, group_ids)
        return keep

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(x.to(self.acc.device)).cpu() if self.acc.num_processes > 1 else x

    def _mean_stats(self, stats: dict[str, list[float]]) -> dict[str, float]:
        """Mean of each statistic over its entries on all ranks (the values of one rank describe only its share of
        the batch); statistics without any entry are left out. Collective: call on every rank."""
        keys = list(stats)
        local = torch.tensor([[float(np.sum(stats[k])), len(stats[k])] for k in keys], dtype=torch.float64)
        tot = self._gather(local.reshape(1, -1)).sum(0).reshape(len(keys), 2)
        return {k: float(tot[q, 0] / tot[q, 1]) for q, k in enumerate(keys) if tot[q, 1] > 0}

    def update(self, traj: Trajectory, cond, adv: torch.Tensor) -> dict[str, float]:
        """PPO-clip + KL over this rank's training batch, ``optimizer_steps_per_epoch`` optimizer steps per inner
        epoch, each over a contiguous part of the batch in micro-batches, looping over the trained steps.

        Args:
            traj: this rank's trajectories ``[n, ...]`` (any ``n``, e.g. after dynamic sampling).
            cond: their prompt embeddings (indexable along the batch, e.g. :class:`~flowrl.models.sd3.PromptEmbeds`).
            adv: ``[n]`` advantages.

        Returns:
            Mean statistics (policy_loss, kl, clipfrac, ratio, approx_kl) and ``first_ratio_max_dev``, the largest
            ``|ratio - 1|`` of the first micro-batch step (exactly 0 when the update is on-policy).
        """
        cfg, a = self.cfg, self.cfg.algorithm
        mb = cfg.trainer.micro_batch
        n = traj.latents.shape[0]
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "kl", "clipfrac", "ratio", "approx_kl")}
        first_ratio_dev = None
        per_sample = a.loss_aggregation == "seq_mean_step_mean"
        seq_level = a.policy_loss in SEQUENCE_LOSSES
        parts = np.array_split(np.arange(n), cfg.trainer.optimizer_steps_per_epoch)
        opt_steps = 0  # optimizer steps taken since the rollout (0: current log-probs equal the stored ones)
        # FSDP: every micro-batch visits the steps trained anywhere on any rank (padding forwards where it has none)
        steps_all = self._global_steps(traj.train_mask) if self.lockstep else None
        for _inner in range(a.inner_epochs):
            for part in parts:
                # Explicit global normaliser: trained (sample, step) pairs ("step_mean") or trained samples
                # ("seq_mean_step_mean", each sample's steps averaged first) of this optimizer step on all ranks.
                m_part = traj.train_mask[torch.as_tensor(part, dtype=torch.long)]
                local = int(m_part.any(1).sum() if per_sample else m_part.sum())
                count = self._gather(torch.tensor([local])).sum().item()
                if count == 0:  # identical decision on every rank (the count is global)
                    continue
                scale = self.acc.num_processes / count
                # Without a KL term a zero-advantage sample has an exactly zero gradient: skip its forward/backward
                # (the normaliser above still counts it, so the update is unchanged). Not under FSDP, where every
                # rank must run the same forwards.
                skip = a.kl_beta == 0 and not self.lockstep
                run_ids = part[(adv[torch.as_tensor(part, dtype=torch.long)] != 0).numpy()] if skip else part
                for j in self._mb_starts(len(run_ids), mb):  # FSDP: a rank with fewer micro-batches gets empty ones
                    ids = torch.as_tensor(run_ids[j : j + mb], dtype=torch.long)
                    tr, c, a_mb = traj.select(ids), cond[ids], adv[ids]
                    w = (1.0 / tr.train_mask.sum(1).clamp_min(1).float()) if per_sample else torch.ones(len(a_mb))
                    trained = steps_all if self.lockstep else torch.nonzero(tr.train_mask.any(0)).flatten().tolist()
                    if seq_level:
                        # A sequence-level ratio (GSPO/GMPO) needs every trained step's current log-prob. Stored
                        # ones are exact before the first optimizer step; afterwards one no-grad forward per step.
                        cur = tr.log_probs.clone()
                        if opt_steps > 0:
                            cur = self._current_log_probs(tr, c, trained)
                    for t in trained:
                        m_all = tr.train_mask[:, t]
                        # Forward only the rows that train step t (all of them unless steps are subsampled).
                        rows = torch.nonzero(m_all).flatten()
                        if len(rows) == 0:  # only under FSDP (steps_all): keep the ranks' forwards in step
                            self._pad_forward(self._grpo_pad)
                            continue
                        full = len(rows) == len(m_all)
                        m = m_all[rows]
                        c_t = c if full else c[rows]
                        a_t, w_t = a_mb[rows], w[rows]
                        x_t, x_next = tr.latents[rows, t], tr.latents[rows, t + 1]
                        lv_t, lp_old = tr.noise_levels[rows, t], tr.log_probs[rows, t : t + 1]
                        sig = self.sigmas[t].expand(x_t.shape[0])
                        v = self.adapter.velocity(x_t, sig, c_t, cfg.sampler.guidance_scale)
                        out = self.step_fn(x_t, v, self.sigmas[t], self.sigmas[t + 1], lv_t, prev_sample=x_next)
                        if seq_level:
                            # The row holds step t's live log-prob and the other steps' current values (constants):
                            # in the GSPO/GMPO step form, column t carries ∂L_i/∂logp_it, so summing the per-step
                            # backward passes (weights 1/|y_i|) gives ∇L_i exactly (flowrl.core.losses.gspo_loss).
                            lp_row = cur[rows].clone()
                            lp_row[:, t] = out.log_prob
                            pl_row = self.policy_loss(lp_row, tr.log_probs[rows], a_t, tr.train_mask[rows],
                                                      a.clip_range, a.clip_range_high)
                            pl = type(pl_row)(loss=pl_row.loss[:, t : t + 1], ratio=pl_row.ratio[:, t : t + 1],
                                              clipped=pl_row.clipped[:, t : t + 1], extra={})
                        elif a.policy_loss == "grpo_guard":
                            # On-policy (validated): μ_old = μ_θ, so the re-centring term b is 0 and GRPO-Guard is
                            # PPO clip on exp(s·log-ratio), divided by -Δ: each step's gradient is weighted by s/|Δ|.
                            dt = self.sigmas[t + 1] - self.sigmas[t]
                            pl = self.policy_loss(out.log_prob[:, None], lp_old, a_t, m[:, None], a.clip_range,
                                                  a.clip_range_high, mean_sq_diff=0.0,
                                                  std_t=(out.std / torch.sqrt(-dt)).reshape(-1, 1), dt=dt)
                        else:
                            pl = self.policy_loss(out.log_prob[:, None], lp_old, a_t, m[:, None],
                                                  a.clip_range, a.clip_range_high)
                        loss = aggregate_loss(pl.loss * w_t[:, None], m[:, None], "step_mean", normaliser=1.0)
                        kl = torch.zeros(())
                        if a.kl_beta > 0:
                            with torch.no_grad(), self.adapter.reference():
                                v_ref = self.adapter.velocity(x_t, sig, c_t, cfg.sampler.guidance_scale)
                            mean_ref = self.step_fn(x_t, v_ref, self.sigmas[t], self.sigmas[t + 1],
                                                    lv_t, prev_sample=x_next).mean
                            std = out.std
                            if a.kl_std == "reference" and cfg.sampler.kind == "sde":
                                std = out.std / torch.sqrt(self.sigmas[t] - self.sigmas[t + 1])
                            kl_per = kl_gaussian_means(out.mean, mean_ref, std) * m * w_t
                            kl = kl_per.sum()
                            loss = loss + a.kl_beta * kl
                        self._backward(loss * scale)
                        with torch.no_grad():
                            r = pl.ratio[m, 0]
                            if first_ratio_dev is None and r.numel():
                                first_ratio_dev = (r - 1).abs().max().item()
                            k = max(int(m.sum()), 1)
                            stats["policy_loss"].append(pl.loss.sum().item() / k)
                            stats["kl"].append(kl.item() / k)
                            stats["clipfrac"].append(pl.clipped.float().sum().item() / k)
                            stats["ratio"].append(r.mean().item() if r.numel() else 1.0)
                            lr_ = (out.log_prob - lp_old[:, 0])[m]
                            stats["approx_kl"].append(0.5 * (lr_**2).mean().item() if lr_.numel() else 0.0)
                self._optimizer_step()
                opt_steps += 1
        res = self._mean_stats(stats)
        res["first_ratio_max_dev"] = float(first_ratio_dev if first_ratio_dev is not None else 0.0)
        return res

    # -- FSDP lock-step ------------------------------------------------------------------------------------------
    def _mb_starts(self, n_local: int, mb: int) -> range:
        """Start indices of the micro-batches over ``n_local`` items. Under FSDP the count is the largest over the
        ranks (collective), so a rank with fewer items runs empty micro-batches (padding forwards); otherwise the
        same starts as ``range(0, n_local, mb)``."""
        k = -(-n_local // mb)
        if self.lockstep:
            k = int(self._gather(torch.tensor([k])).max())
        return range(0, k * mb, mb)

    def _global_steps(self, train_mask: torch.Tensor) -> list[int]:
        """Denoising steps trained by some sample on some rank (``train_mask`` ``[n, T]``; collective)."""
        local = train_mask.any(0).to(torch.int64)[None]
        return torch.nonzero(self._gather(local).amax(0)).flatten().tolist()

    def _dummy_inputs(self):
        """A one-sample input for padding forwards: zero latents, the first σ of the grid, the empty prompt."""
        res = self.cfg.model.resolution
        x = torch.zeros(1, *self.adapter.latent_shape(res, res), device=self.adapter.device)
        return x, self.sigmas[:1].clone(), self.adapter.negative(1)

    def _pad_forward(self, forward) -> None:
        """FSDP padding: run ``forward(x, σ, cond)`` (a list of outputs) on :meth:`_dummy_inputs` and back-propagate
        ``0 · Σ outputs`` through those that carry gradients. The gradient contribution is exactly zero, but the
        rank runs the same FSDP all-gathers (forward) and reduce-scatters (backward) as a rank that has data here, so
        no rank waits for a collective the others never start. ``forward`` must make the same denoiser calls, with
        and without gradients, as the real step it stands in for."""
        x, sig, c = self._dummy_inputs()
        outs = [o for o in forward(x, sig, c) if o is not None and o.requires_grad]
        if outs:
            self._backward(sum(o.float().sum() for o in outs) * 0.0)

    def _velocity_pad(self, guidance: float):
        """The denoiser call of one velocity prediction at ``guidance`` (FSDP padding, :meth:`_pad_forward`)."""
        return lambda x, sig, c: [self.adapter.velocity(x, sig, c, guidance)]

    def _grpo_pad(self, x, sig, c) -> list:
        """The denoiser calls of one Flow-GRPO step (policy with gradients, reference without when ``kl_beta > 0``)."""
        g = self.cfg.sampler.guidance_scale
        v = self.adapter.velocity(x, sig, c, g)
        if self.cfg.algorithm.kl_beta > 0:
            with torch.no_grad(), self.adapter.reference():
                self.adapter.velocity(x, sig, c, g)
        return [v]

    @torch.no_grad()
    def _current_log_probs(self, tr: Trajectory, cond, steps: list[int]) -> torch.Tensor:
        """``[B, T]`` log-probabilities of the stored transitions under the current weights at ``steps`` (stored
        values elsewhere); no gradients."""
        cur = tr.log_probs.clone()
        for t in steps:
            rows = torch.nonzero(tr.train_mask[:, t]).flatten()
            if len(rows) == 0 and self.lockstep:  # keep the ranks' forwards in step
                self._pad_forward(self._velocity_pad(self.cfg.sampler.guidance_scale))
                continue
            x_t = tr.latents[rows, t]
            v = self.adapter.velocity(x_t, self.sigmas[t].expand(len(rows)), cond[rows], self.cfg.sampler.guidance_scale)
            cur[rows, t] = self.step_fn(x_t, v, self.sigmas[t], self.sigmas[t + 1], tr.noise_levels[rows, t],
                                        prev_sample=tr.latents[rows, t + 1]).log_prob
        return cur

    def update_nft(self, traj: Trajectory, cond, adv: torch.Tensor, sample_ids: list[int], epoch: int) -> dict[str, float]:
        """DiffusionNFT update (Zheng et al. 2025, arXiv 2509.16117, Eq. 8 / Alg. 1) on the rollouts' clean latents.

        No likelihood and no trajectory: each clean latent ``x0`` (``traj.final``) is re-noised by the forward process,
        ``x_σ = (1-σ)·x0 + σ·ε`` with ``σ`` logit-normal shifted like SD3 pretraining and ``ε ~ N(0, I)`` (seeded per
        sample, rank-independent; with ``algorithm.nft_shared_draws`` one set per group, common random numbers that
        cancel the group-shared part of the regression noise), target ``v* = ε - x0``. With the old (sampling) velocity ``v_old`` and the trained
        one ``v_θ`` (both conditional, no CFG, as in the paper; with ``algorithm.nft_guidance_scale = g > 1`` both
        are the CFG-guided ``v_u + g·(v_c - v_u)``, the policy that rolls out and is evaluated at guidance g), the implicit positive and negative policies are
        ``v⁺ = (1-β)·v_old + β·v_θ`` and ``v⁻ = (1+β)·v_old - β·v_θ``; the loss per draw is
        ``r·‖v⁺ - v*‖² + (1-r)·‖v⁻ - v*‖²`` (mean over dimensions) with the optimality weight
        ``r = clip(A / (2·A_max) + ½, 0, 1)``, ``A_max = algorithm.advantage_clip``. On-policy
        (one optimizer step per epoch) ``v_old`` is ``v_θ`` detached, so the gradient is
        ``β·(2r-1)·∇‖v_θ - v*‖²``: reward-weighted flow matching that pulls good samples and pushes bad ones.
        With several optimizer steps or inner epochs ``v_old`` is computed once, before the first step.
        ``algorithm.nft_detach_uncond`` / ``nft_uncond_anchor`` train the guided field through its conditional branch
        only and hold the unconditional branch at the reference (:meth:`_guided_velocity_split`).

        ``algorithm.name=raft`` (reward-ranked fine-tuning, RAFT, Dong et al. 2023, arXiv 2304.06767, on the same
        forward-process draws): plain flow matching ``‖v_θ - v*‖²`` on the samples whose advantage is > 0 (above their
        group's mean; weight 1) and nothing on the others, averaged over the trained (sample, draw) pairs of all ranks:
        supervised fine-tuning on the policy's own better samples, no push away from the worse ones.

        Args:
            traj: trajectories ``[n, ...]`` (only ``final`` is used; any sampler, the ODE included).
            cond: prompt embeddings ``[n, ...]``; adv: ``[n]`` advantages; sample_ids: the epoch's sample indices.

        Returns:
            Mean ``nft_loss``, ``r`` (optimality weight) and ``v_old_err`` (``‖v_old - v*‖²``) over the draws.
        """
        cfg, a = self.cfg, self.cfg.algorithm
        mb = cfg.trainer.micro_batch
        x0_all = traj.final
        n = x0_all.shape[0]
        k = a.nft_timesteps
        r_all = (adv / (2 * a.advantage_clip) + 0.5).clamp(0, 1)
        # forward-process draws, one generator per sample: [n, k] σ and [n, k, ...] ε
        sig, eps = [], []
        for i in sample_ids:
            key = i // cfg.trainer.group_size if a.nft_shared_draws else i  # group-shared (CRN) or per-sample draws
            g = torch.Generator().manual_seed(sample_seed(cfg.trainer.seed, epoch, NFT_SEED_OFFSET + key))
            s_i, e_i = forward_process_draws(g, k, tuple(x0_all.shape[1:]))  # logit-normal σ, SD3 shift 3
            sig.append(s_i)
            eps.append(e_i)
        sig_all = torch.stack(sig) if sig else torch.zeros(0, k)
        eps_all = torch.stack(eps) if eps else torch.zeros(0, k, *x0_all.shape[1:])
        parts = np.array_split(np.arange(n), cfg.trainer.optimizer_steps_per_epoch)
        on_policy = cfg.trainer.optimizer_steps_per_epoch == 1 and a.inner_epochs == 1
        v_old_all = None
        if not on_policy:
            v_old_all = torch.zeros_like(eps_all)
            with torch.no_grad():
                for j in self._mb_starts(n, mb):
                    ids = torch.arange(n)[j : j + mb]
                    if len(ids) == 0:  # FSDP padding: this rank has fewer samples than another
                        for _d in range(k):
                            self._pad_forward(self._velocity_pad(a.nft_guidance_scale))
                        continue
                    for d in range(k):
                        s_ = sig_all[ids, d]
                        x_t = (1 - s_.view(-1, 1, 1, 1)) * x0_all[ids] + s_.view(-1, 1, 1, 1) * eps_all[ids, d]
                        v_old_all[ids, d] = self.adapter.velocity(x_t, s_, cond[ids], a.nft_guidance_scale)
        stats: dict[str, list[float]] = {"nft_loss": [], "r": [], "v_old_err": []}
        raft = a.name == "raft"
        if raft:  # reward-ranked fine-tuning: flow matching on the above-group-mean samples only (weight 1, else 0)
            r_all = (adv > 0).float()
        for _inner in range(a.inner_epochs):
            for part in parts:
                n_part = int(r_all[torch.as_tensor(part, dtype=torch.long)].sum()) if raft else len(part)
                count = self._gather(torch.tensor([n_part * k])).sum().item()
                if count == 0:
                    continue
                scale = self.acc.num_processes / count
                for j in self._mb_starts(len(part), mb):
                    ids = torch.as_tensor(part[j : j + mb], dtype=torch.long)
                    if len(ids) == 0:  # FSDP padding: this rank has fewer samples than another
                        for _d in range(k):
                            self._pad_forward(self._nft_pad)
                        continue
                    x0, c, r = x0_all[ids], cond[ids], r_all[ids]
                    for d in range(k):
                        s_ = sig_all[ids, d]
                        e = eps_all[ids, d]
                        x_t = (1 - s_.view(-1, 1, 1, 1)) * x0 + s_.view(-1, 1, 1, 1) * e
                        target = e - x0
                        anchor = None
                        if a.nft_detach_uncond or a.nft_uncond_anchor > 0:
                            v, anchor = self._guided_velocity_split(x_t, s_, c)
                        else:
                            v = self.adapter.velocity(x_t, s_, c, a.nft_guidance_scale)
                        v_old = v.detach() if v_old_all is None else v_old_all[ids, d]
                        v_pos = (1 - a.nft_beta) * v_old + a.nft_beta * v
                        v_neg = (1 + a.nft_beta) * v_old - a.nft_beta * v
                        err_pos = (v_pos - target).pow(2).flatten(1).mean(1)
                        if raft:
                            per = r * (v - target).pow(2).flatten(1).mean(1)
                        else:
                            err_neg = (v_neg - target).pow(2).flatten(1).mean(1)
                            per = r * err_pos + (1 - r) * err_neg
                        loss = per.sum() * scale
                        if anchor is not None:
                            loss = loss + a.nft_uncond_anchor * anchor.sum() * scale
                            stats.setdefault("uncond_drift", []).append(anchor.mean().item())
                        self._backward(loss)
                        with torch.no_grad():
                            stats["nft_loss"].append(per.mean().item())
                            stats["r"].append(r.mean().item())
                            stats["v_old_err"].append((v_old - target).pow(2).mean().item())
                self._optimizer_step()
        res = self._mean_stats(stats)
        res["first_ratio_max_dev"] = 0.0
        return res

    def _nft_pad(self, x, sig, c) -> list:
        """The denoiser calls of one DiffusionNFT draw (FSDP padding, :meth:`_pad_forward`)."""
        a = self.cfg.algorithm
        if a.nft_detach_uncond or a.nft_uncond_anchor > 0:
            return list(self._guided_velocity_split(x, sig, c))
        return [self.adapter.velocity(x, sig, c, a.nft_guidance_scale)]

    def _guided_velocity_split(self, x_t: torch.Tensor, sigma: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The guided velocity trained through its conditional branch only, and the unconditional drift.

        ``u = sg(v_u) + g·(v_c - sg(v_u))`` with ``g = algorithm.nft_guidance_scale``: the value of the CFG field the
        policy samples with, but the gradient reaches the LoRA through ``v_c`` alone (weight ``g``), instead of the
        ``1 - g < 0`` weight the joint parameterisation gives the unconditional branch. With
        ``algorithm.nft_uncond_anchor > 0`` the unconditional forward keeps its graph and the second return value is
        ``‖v_u - v_u^ref‖²`` per sample (mean over dimensions; reference = LoRA disabled), which the update adds with
        that weight so the shared LoRA does not move the unconditional field that CFG extrapolates from.

        Args:
            x_t: ``[B, C, h, w]`` noised latents at ``sigma`` (``[B]``); cond: their prompt embeddings.

        Returns:
            ``(u [B, C, h, w], drift [B] or None)``.
        """
        a = self.cfg.algorithm
        neg = self.adapter.negative(x_t.shape[0])
        drift = None
        if a.nft_uncond_anchor > 0:  # both branches need a graph: one batched forward over [uncond; cond]
            v_u, v_c = self.adapter.velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]),
                                             type(cond).cat([neg, cond]), 1.0).chunk(2)
            with torch.no_grad(), self.adapter.reference():
                v_ref = self.adapter.velocity(x_t, sigma, neg, 1.0)
            drift = (v_u - v_ref).pow(2).flatten(1).mean(1)
            v_u = v_u.detach()
        else:
            v_c = self.adapter.velocity(x_t, sigma, cond, 1.0)
            with torch.no_grad():
                v_u = self.adapter.velocity(x_t, sigma, neg, 1.0)
        return v_u + a.nft_guidance_scale * (v_c - v_u), drift

    # -- Flow-DPO ------------------------------------------------------------------------------------------------
    def dpo_online_pairs(self, batch: dict, epoch: int):
        """This rank's share of the online Flow-DPO pairs of an epoch's rollouts.

        In every group with reward spread the best sample is the winner and the worst the loser
        (:func:`~flowrl.core.dpo.best_worst_pairs` on the rewards of all ranks). A group may span ranks, so the clean
        latents of all ranks are gathered; pair ``p`` (ascending group id) is trained by rank ``p mod world``. The
        pair's prompt is its group's prompt (from :func:`make_epoch`, identical on every rank).

        Args:
            batch: :meth:`collect`'s output (``traj.final`` ``[n, C, h, w]``, ``rewards_all`` / ``group_ids_all``
                ``[N]``, N = n × world).

        Returns:
            ``(x0_w, x0_l, prompts, keys, n_pairs)``: winner and loser latents ``[P_r, C, h, w]``, their prompts and
            keys (the winner's sample index in the epoch, seeds the pair's σ and noise), and the global pair count.

        Raises:
            RuntimeError: the gathered latents do not line up with the rewards (e.g. dynamic sampling).
        """
        rank, world = self.acc.process_index, self.acc.num_processes
        r_all, g_all = batch["rewards_all"], batch["group_ids_all"]
        x_all = self._gather(batch["traj"].final.contiguous()).cpu()
        if x_all.shape[0] != r_all.shape[0]:
            raise RuntimeError(f"online DPO: {x_all.shape[0]} gathered latents for {r_all.shape[0]} rewards; "
                               "set algorithm.dynamic_sampling=false")
        pairs = best_worst_pairs(r_all.float(), g_all)
        prompts_all = make_epoch(self.cfg, self.train_md, epoch, 0, 1).prompts  # global sample order
        mine = pairs[rank::world]
        return (x_all[mine[:, 0]], x_all[mine[:, 1]], [prompts_all[i] for i in mine[:, 0].tolist()],
                mine[:, 0].tolist(), len(pairs))

    def dpo_offline_pairs(self, epoch: int):
        """This rank's share of the epoch's offline pairs, encoded to latents with the adapter's VAE.

        Each epoch trains ``trainer.groups_per_epoch`` pairs (a pair is a "group" of two images of one prompt) taken
        from the shuffled stream of :func:`offline_pair_order`; pair ``j`` of the epoch goes to rank ``j mod world``.
        Images are loaded with :func:`load_image` at ``model.resolution`` and encoded by ``encode_images``
        (posterior mean) in micro-batches of ``trainer.micro_batch`` images.

        Returns:
            ``(x0_w, x0_l, prompts, keys, n_pairs)`` as :meth:`dpo_online_pairs` (keys = position ``j`` in the epoch).
        """
        cfg = self.cfg
        rank, world = self.acc.process_index, self.acc.num_processes
        n_pairs = cfg.trainer.groups_per_epoch
        order = offline_pair_order(cfg.trainer.seed, epoch, n_pairs, len(self.dpo_pairs))
        keys = list(range(rank, n_pairs, world))
        chosen = [self.dpo_pairs[order[j]] for j in keys]
        res, mb = cfg.model.resolution, max(1, cfg.trainer.micro_batch)

        def encode(paths):
            if not paths:
                return torch.zeros(0, *self.adapter.latent_shape(res, res))
            out = []
            for j in range(0, len(paths), mb):
                imgs = torch.stack([load_image(p, res) for p in paths[j : j + mb]])
                out.append(self.adapter.encode_images(imgs).cpu())
            return torch.cat(out)

        return (encode([p.chosen for p in chosen]), encode([p.rejected for p in chosen]),
                [p.prompt for p in chosen], keys, n_pairs)

    def encode_unique(self, prompts: list[str]) -> dict[str, object]:
        """Each distinct prompt of ``prompts`` encoded once (in micro-batches of ``trainer.micro_batch``): prompt →
        its ``[1, ...]`` embeddings, so pairs that share a prompt share one encoding."""
        mb = max(1, self.cfg.trainer.micro_batch)
        cache: dict[str, object] = {}
        uniq = list(dict.fromkeys(prompts))
        for j in range(0, len(uniq), mb):
            enc = self.adapter.encode(uniq[j : j + mb])
            cache.update({p: enc[q : q + 1] for q, p in enumerate(uniq[j : j + mb])})
        return cache

    def update_dpo(self, x0_w: torch.Tensor, x0_l: torch.Tensor, prompts: list[str], keys: list[int],
                   epoch: int) -> dict[str, float]:
        """Flow-DPO update: Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, Eq. 14) on velocity errors.

        For each pair, ``σ`` and ``ε`` are drawn once per inner epoch from a generator seeded by
        ``(seed, epoch, DPO_SEED_OFFSET + key)`` (:func:`forward_process_draws`: logit-normal σ with the SD3 shift,
        the same scheme as :meth:`update_nft`), shared by winner and loser (:func:`~flowrl.core.dpo.dpo_noisy_pair`:
        ``x_σ = (1-σ)·x0 + σ·ε``, target ``ε - x0``). The policy velocity (LoRA on, with gradients) and the
        reference velocity (LoRA off, :meth:`adapter.reference`) are both the *conditional* prediction (guidance scale 1, as in
        :meth:`update_nft` and Diffusion-DPO's training; rollouts still use ``sampler.guidance_scale``), each one
        forward over ``[winners; losers]``. Loss :func:`~flowrl.core.dpo.diffusion_dpo_loss` with
        ``β = algorithm.dpo_beta`` (per-dimension mean squared errors), summed over pairs and divided by the global
        number of pairs of the optimizer step (all micro-batches and ranks; gradients all-reduced with a mean), so
        micro-batching and the number of ranks do not change the update. ``optimizer_steps_per_epoch`` optimizer
        steps per inner epoch, each over a contiguous part of the pairs; ``trainer.micro_batch`` images (half as
        many pairs) per forward.

        The reference is always the base model, so at the first step (LoRA ``B = 0``) policy and reference agree
        exactly and every pair's loss is ``log 2``.

        Args:
            x0_w, x0_l: ``[P, C, h, w]`` clean winner / loser latents of this rank's pairs (any device).
            prompts: ``[P]`` the pairs' prompts; keys: ``[P]`` distinct integers seeding each pair's draws.
            epoch: the epoch (seeds the draws).

        Returns:
            Means over all pairs and draws of all ranks: ``dpo_loss``, ``dpo_implicit_acc`` (share of pairs with
            margin > 0), ``dpo_reward_margin`` (``z``), ``dpo_chosen_reward`` / ``dpo_rejected_reward`` (implicit
            rewards), ``dpo_err_w`` / ``dpo_err_l`` (policy velocity errors); ``dpo_first_loss`` (this rank's first
            micro-batch, before any optimizer step of this update). Empty when no rank has a pair.
        """
        cfg, a = self.cfg, self.cfg.algorithm
        dev = self.acc.device
        n, k = x0_w.shape[0], a.inner_epochs
        shape = tuple(x0_w.shape[1:])
        pmb = max(1, cfg.trainer.micro_batch // 2)  # pairs per forward: micro_batch images
        sig_all, eps_all = pair_draws(cfg.trainer.seed, epoch, DPO_SEED_OFFSET, keys, k, shape)
        cache = self.encode_unique(prompts)
        parts = np.array_split(np.arange(n), cfg.trainer.optimizer_steps_per_epoch)
        names = ("dpo_loss", "dpo_implicit_acc", "dpo_reward_margin", "dpo_chosen_reward", "dpo_rejected_reward",
                 "dpo_err_w", "dpo_err_l")
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # the last entry counts pair draws
        first_loss = None
        for d in range(k):
            for part in parts:
                count = self._gather(torch.tensor([len(part)])).sum().item()
                if count == 0:  # identical decision on every rank (the count is global)
                    continue
                for j in self._mb_starts(len(part), pmb):
                    ids = torch.as_tensor(part[j : j + pmb], dtype=torch.long)
                    b = len(ids)
                    if b == 0:  # FSDP padding: this rank has fewer pairs than another
                        self._pad_forward(self._dpo_pad)
                        continue
                    x_w, x_l, tgt_w, tgt_l = dpo_noisy_pair(x0_w[ids].to(dev), x0_l[ids].to(dev),
                                                            sig_all[ids, d].to(dev), eps_all[ids, d].to(dev))
                    c = type(cache[prompts[0]]).cat([cache[prompts[i]] for i in ids.tolist()])
                    c2 = type(c).cat([c, c])
                    x2, s2 = torch.cat([x_w, x_l]), torch.cat([sig_all[ids, d], sig_all[ids, d]])
                    v = self.adapter.velocity(x2, s2, c2, 1.0)
                    with torch.no_grad(), self.adapter.reference():
                        v_ref = self.adapter.velocity(x2, s2, c2, 1.0)
                    out = diffusion_dpo_loss(v[:b], v[b:], v_ref[:b], v_ref[b:], tgt_w, tgt_l, a.dpo_beta,
                                             normaliser=count / self.acc.num_processes)
                    self._backward(out.loss)
                    with torch.no_grad():
                        if first_loss is None:
                            first_loss = out.per_pair_loss.mean().item()
                        vals = (out.per_pair_loss, (out.logits > 0).float(), out.logits, out.chosen_reward,
                                out.rejected_reward, out.model_err_w, out.model_err_l)
                        sums[:-1] += torch.stack([v_.detach().double().sum().cpu() for v_ in vals])
                        sums[-1] += b
                self._optimizer_step()
        tot = self._gather(sums.float()).reshape(-1, len(names) + 1).double().sum(0)
        if tot[-1] == 0:
            return {}
        res = {name: float(tot[q] / tot[-1]) for q, name in enumerate(names)}
        if first_loss is not None:
            res["dpo_first_loss"] = first_loss
        return res

    def _dpo_pad(self, x, sig, c) -> list:
        """The denoiser calls of one Flow-DPO micro-batch (policy with gradients, reference without)."""
        v = self.adapter.velocity(x, sig, c, 1.0)
        with torch.no_grad(), self.adapter.reference():
            self.adapter.velocity(x, sig, c, 1.0)
        return [v]

    def _per_tag(self, rewards, tags: list[str]) -> dict[str, float]:
        """Mean training reward per metadata ``tag`` over all ranks: ``{"reward/tag/<tag>": mean}`` (tags with no
        sample this epoch are left out)."""
        sums = torch.zeros(len(self.tag_names), dtype=torch.float64)
        counts = torch.zeros(len(self.tag_names), dtype=torch.float64)
        index = {t: i for i, t in enumerate(self.tag_names)}
        for r, t in zip(np.asarray(rewards, dtype=np.float64).tolist(), tags):
            if t in index:
                sums[index[t]] += r
                counts[index[t]] += 1
        tot = self._gather(torch.cat([sums, counts])[None]).sum(0)
        k = len(self.tag_names)
        return {f"reward/tag/{t}": float(tot[i] / tot[k + i]) for i, t in enumerate(self.tag_names) if tot[k + i] > 0}

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, or the DeepSpeed engine's backward under ZeRO-2 (gradients reduced into the ranks'
        partitions and accumulated until :meth:`_optimizer_step`)."""
        if self.ds is not None:
            from flowrl.deepspeed_zero import backward

            backward(self.ds, loss)
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.ds is not None:  # ZeRO-2: the engine clips and refuses a non-finite step itself (no all-reduce here)
            from flowrl.deepspeed_zero import optimizer_step

            norm = optimizer_step(self.ds)
        else:
            norm = reduce_and_clip(self.acc, self.params, self.cfg.trainer.grad_clip, sharded=self.fsdp)
        if not math.isfinite(norm):  # NaN/inf loss: never apply the step; keep the last good weights
            if self.ds is None:
                self.opt.zero_grad(set_to_none=True)
            path = self.save(f"nan_loss_epoch_{self.epoch:04d}", self.epoch - 1, self.history)
            raise RuntimeError(
                f"non-finite gradient (norm {norm}) at epoch {self.epoch}, optimizer step {self.opt_steps + 1}: "
                f"the loss is NaN/inf. The step was not applied and the weights before it were saved to {path}. "
                "Lower trainer.lr, check the rewards and advantages (algorithm.advantage_eps, advantage_clip) or "
                f"trainer.mixed_precision, then continue with trainer.resume={path}")
        self.grad_norms.append(norm)  # pre-clip global norm, logged as train/grad_norm
        if self.ds is None:  # (the engine has stepped and zeroed its gradients already)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.opt_steps += 1
        if self.ema is not None:
            self.ema.step(self.opt_steps)

    # ------------------------------------------------------------------------------------------------------------
    def save(self, name: str, epoch: int = -1, history: list | None = None) -> Path | None:
        """Save the LoRA (``lora/``; loadable by ``pipeline.load_lora_weights``), its EMA (``lora_ema/``) and
        ``trainer_state.pt`` (trainable weights, optimizer, EMA, counters, last completed ``epoch``, history) into
        ``checkpoints/<name>``, written to a temporary folder and then renamed, so a checkpoint folder without the
        ``.tmp`` suffix is always complete. Every random draw of an epoch is seeded by ``(seed, epoch, sample)``, so
        this is all an exact resume needs (:meth:`resume`).

        Full fine-tuning (``model.lora_rank=0``) writes the whole denoiser instead of the LoRA: ``transformer/`` (the
        pipeline component's name, ``unet/`` for the UNet family; a diffusers model folder, float32, loadable with
        ``SD3Transformer2DModel.from_pretrained`` or the family's class), ``transformer_ema/`` with EMA on, and
        ``trainer_state.pt`` with the optimizer state keyed by parameter names (loadable with or without FSDP, any
        number of ranks), counters, epoch and history; the weights themselves are read back from the folders.
        Under FSDP every rank takes part (the full state dicts are gathered on rank 0), and rank 0 writes. Under
        DeepSpeed ZeRO-2 every rank also writes its optimizer partition (``zero_optim_rank{r}.pt``) into the same
        temporary folder before rank 0 renames it (:meth:`_save_zero_partitions`; ``trainer_state.pt`` has
        ``optimizer: None`` and ``zero_optim: <ranks>``)."""
        self.acc.wait_for_everyone()
        full = None
        # under FSDP every rank takes part in gathering (rank 0 receives the full tensors); otherwise rank 0 copies
        if self.full_ft and (self.fsdp or self.acc.is_main_process):
            from flowrl.fsdp import full_optimizer_state_dict, full_state_dict

            den = self.adapter.transformer
            # ZeRO-2: the optimizer state is partitioned over the ranks; each rank saves its own (_save_zero_partitions)
            opt_state = None if self.ds is not None else full_optimizer_state_dict(den, self.opt)
            full = {"model": full_state_dict(den), "ema": None, "optimizer": opt_state}
            if self.ema is not None:
                with self.ema.swapped():
                    full["ema"] = full_state_dict(den)
        final = self.out / "checkpoints" / name
        tmp = final.with_name(final.name + ".tmp")
        # ZeRO-2: every rank writes its optimizer partition into the temporary folder first (collective)
        zero_err = self._save_zero_partitions(tmp) if self.ds is not None else None
        if not self.acc.is_main_process:
            if zero_err is not None:
                raise RuntimeError(f"saving checkpoint {final} failed: {zero_err}")
            return None
        if self.ds is None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            if zero_err is not None:
                raise OSError(zero_err)
            tmp.mkdir(parents=True, exist_ok=self.ds is not None)
            if full is not None:
                from flowrl.models.sd3 import save_denoiser

                attr = self.adapter.denoiser_attr
                save_denoiser(self.adapter.transformer, tmp / attr, full["model"])
                if full["ema"] is not None:
                    save_denoiser(self.adapter.transformer, tmp / f"{attr}_ema", full["ema"])
                torch.save({"finetune": "full", "optimizer": full["optimizer"], "opt_steps": self.opt_steps,
                            "zero_optim": self.acc.num_processes if self.ds is not None else 0, "ema": None,
                            "ema_updates": self.ema.updates if self.ema else 0, "params": None,
                            "epoch": epoch, "history": list(history or [])}, tmp / "trainer_state.pt")
            else:
                self.adapter.save_lora(tmp / "lora")
                if self.ema is not None:
                    with self.ema.swapped():
                        self.adapter.save_lora(tmp / "lora_ema")
                torch.save({"optimizer": self.opt.state_dict(), "opt_steps": self.opt_steps,
                            "ema": self.ema.shadow if self.ema else None,
                            "ema_updates": self.ema.updates if self.ema else 0,
                            "params": [p.detach().clone() for p in self.params], "epoch": epoch,
                            "history": list(history or [])}, tmp / "trainer_state.pt")
        except (OSError, RuntimeError) as e:  # a full disk surfaces as OSError(ENOSPC) or torch's RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint; the earlier ones are intact
            last = self.find_checkpoint("auto")
            raise RuntimeError(
                f"saving checkpoint {final} failed ({type(e).__name__}: {e}); is the disk full? Nothing partial was "
                f"left behind; the last complete checkpoint is {last or 'none'}. Free space in {self.out} (or set "
                f"trainer.output_dir elsewhere) and continue with trainer.resume=auto") from e
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def _save_zero_partitions(self, tmp: Path) -> str | None:
        """ZeRO-2 part of :meth:`save` (collective): rank 0 creates the empty temporary folder, then every rank writes
        its optimizer partition (``zero_optim_rank{r}.pt``) into it. Returns None when every rank succeeded, else the
        first failure (the same on all ranks), so that all ranks stop together and rank 0 renames the folder only
        after every partition is complete. The folder must be on a filesystem all ranks share."""
        from flowrl.deepspeed_zero import save_optimizer_partition

        rank, err = self.acc.process_index, ""
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                err = f"rank 0 could not create {tmp} ({type(e).__name__}: {e})"
        if not self._all_ok(not err) and not err:
            err = f"rank 0 could not create {tmp}"
        if not err:
            try:
                save_optimizer_partition(self.ds, tmp, rank)
            except (OSError, RuntimeError) as e:  # a full disk: OSError(ENOSPC) or torch's RuntimeError
                err = f"rank {rank} could not write its ZeRO-2 optimizer partition ({type(e).__name__}: {e})"
            ok = self._all_ok(not err)
            if not ok and not err:
                err = f"another rank could not write its ZeRO-2 optimizer partition into {tmp} (see its log)"
        return err or None

    def _all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank (collective)."""
        return bool(self._gather(torch.tensor([int(ok)])).min().item())

    def find_checkpoint(self, spec: str) -> Path | None:
        """``trainer.resume``: ``""`` → None; ``"auto"`` → the complete checkpoint with the highest saved epoch in
        ``output_dir/checkpoints`` (None if there is none); otherwise a checkpoint folder path.

        Raises:
            FileNotFoundError: a given path without ``trainer_state.pt``.
        """
        if not spec:
            return None
        if spec == "auto":
            best, best_epoch = None, -2
            for d in sorted((self.out / "checkpoints").glob("*")):
                f = d / "trainer_state.pt"
                if d.suffix == ".tmp" or not f.is_file():
                    continue
                # mmap: only the small "epoch" entry is read, not the optimizer state (large under full fine-tuning)
                ep = torch.load(f, map_location="cpu", weights_only=False, mmap=True).get("epoch", -1)
                if ep > best_epoch:
                    best, best_epoch = d, ep
            return best
        d = Path(spec)
        if not (d / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"trainer.resume={spec!r}: no trainer_state.pt there; give a checkpoint folder "
                                    f"(e.g. {self.out / 'checkpoints' / 'epoch_0010'}) or 'auto'")
        return d

    def resume(self, ckpt: Path) -> tuple[int, list]:
        """Load weights, optimizer, EMA and counters from ``ckpt``; returns (first epoch to run, history so far).

        Raises:
            ValueError: a LoRA checkpoint for a full fine-tuning run or the reverse, or parameter shapes / names that
                differ from this configuration's.
        """
        st = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
        if (st.get("finetune") == "full") != self.full_ft:
            have = "a full fine-tuning" if st.get("finetune") == "full" else "a LoRA"
            want = ("full fine-tuning (model.lora_rank=0)" if self.full_ft
                    else f"a LoRA (model.lora_rank={self.cfg.model.lora_rank})")
            raise ValueError(f"checkpoint {ckpt} is {have} checkpoint but this run trains {want}")
        if self.full_ft:
            return self._resume_full(ckpt, st)
        if len(st["params"]) != len(self.params) or any(a.shape != b.shape for a, b in zip(st["params"], self.params)):
            raise ValueError(f"checkpoint {ckpt} does not match this model/LoRA configuration (parameter shapes differ)")
        with torch.no_grad():
            for p, q in zip(self.params, st["params"]):
                p.copy_(q)
        self.opt.load_state_dict(st["optimizer"])
        self.opt_steps = st["opt_steps"]
        if self.ema is not None and st.get("ema") is not None:
            self.ema.shadow = [s.clone() for s in st["ema"]]
            self.ema.updates = st.get("ema_updates", 0)
        return st["epoch"] + 1, list(st.get("history", []))

    def _resume_full(self, ckpt: Path, st: dict) -> tuple[int, list]:
        """:meth:`resume` of a full fine-tuning checkpoint: the EMA weights (``<denoiser>_ema/``) are loaded into the
        denoiser and copied into the EMA's shadow (so it holds whatever the parameters are: whole tensors, or this
        rank's FSDP shards), then the live weights (``<denoiser>/``) and the optimizer state. Collective under FSDP
        (rank 0 reads the files and broadcasts)."""
        from flowrl.fsdp import is_sharded, load_full_optimizer_state_dict, load_full_state_dict
        from flowrl.models.sd3 import load_denoiser_state

        den, attr = self.adapter.transformer, self.adapter.denoiser_attr
        reads = self.acc.is_main_process or not is_sharded(den)  # under FSDP only rank 0 reads, then broadcasts

        def load(folder: Path) -> None:
            try:
                load_full_state_dict(den, load_denoiser_state(folder) if reads else {})
            except (RuntimeError, KeyError) as e:
                raise ValueError(f"checkpoint {folder} does not match this model's {attr}: {e}") from e

        if self.ema is not None and (ckpt / f"{attr}_ema").is_dir():
            load(ckpt / f"{attr}_ema")
            self.ema.shadow = [p.detach().clone() for p in self.params]
            self.ema.updates = st.get("ema_updates", 0)
        load(ckpt / attr)
        if self.ds is not None:  # ZeRO-2: each rank loads its optimizer partition if saved with as many ranks
            from flowrl.deepspeed_zero import load_optimizer_partition, partition_file, restore_master_weights

            rank, world = self.acc.process_index, self.acc.num_processes
            saved = st.get("zero_optim", 0)
            if saved == world and all(partition_file(ckpt, r).is_file() for r in range(world)):
                load_optimizer_partition(self.ds, ckpt, rank, world)
                if self.acc.is_main_process:
                    print(f"DeepSpeed ZeRO-2: resumed the weights, the EMA and the optimizer state (AdamW moments, "
                          f"partitioned over {world} ranks)", flush=True)
            else:  # the float32 master partitions take the loaded weights; AdamW restarts
                restore_master_weights(self.ds)
                why = (f"its ZeRO-2 optimizer partitions were saved by {saved} ranks, this run has {world}"
                       if saved and saved != world else "the checkpoint holds no ZeRO-2 optimizer partitions")
                if self.acc.is_main_process:
                    print(f"DeepSpeed ZeRO-2: resumed the weights and the EMA; the optimizer state (AdamW moments) "
                          f"restarts from zero ({why})", flush=True)
        elif st.get("optimizer") is None:  # a ZeRO-2 checkpoint resumed without it: AdamW restarts too
            if self.acc.is_main_process:
                print(f"checkpoint {ckpt} has no optimizer state (saved under DeepSpeed ZeRO-2): AdamW restarts",
                      flush=True)
        else:
            load_full_optimizer_state_dict(den, self.opt, st["optimizer"] if reads else {})
        self.opt_steps = st["opt_steps"]
        return st["epoch"] + 1, list(st.get("history", []))

    def evaluate_heldout(self, label: str, use_ema: bool = True, base: bool = False) -> dict:
        """Held-out GenEval-style evaluation (ODE, ``eval_steps``, fixed seeds) of the base model or the trained one,
        scored by the training reward (``algorithm=draft``: by ``algorithm.draft_eval_reward`` when it is set).

        Under FSDP call it on every rank: each runs the same sampling (the sharded denoiser needs every rank in every
        forward) and only rank 0 writes ``eval/<label>``. Full fine-tuning without a kept reference copy evaluates
        the base model with the live weights, which is only possible before the first optimizer step.

        Raises:
            RuntimeError: ``base=True`` under full fine-tuning without a reference copy after training started.
        """
        cfg, t = self.cfg, self.cfg.trainer
        md = self.test_md[: t.eval_max_prompts] if t.eval_max_prompts else self.test_md
        # DRaFT trains on a differentiable proxy; with algorithm.draft_eval_reward the benchmark scores held-out images
        reward_fn = (self.draft.eval_reward if self.draft is not None and self.draft.eval_reward is not None
                     else self.reward_fn)
        kwargs = dict(images_per_prompt=t.eval_images_per_prompt, steps=cfg.sampler.eval_steps,
                      guidance_scale=cfg.sampler.eval_guidance_scale, resolution=cfg.model.resolution,
                      seed=10_000 + t.seed, batch=t.eval_batch,
                      out_dir=self.out / "eval" / label if self.acc.is_main_process else None,
                      progress=self.acc.is_main_process)
        if base:
            if self.full_ft and getattr(self.adapter, "_frozen_reference", None) is None:
                if self.opt_steps:
                    raise RuntimeError("the base model cannot be evaluated after training started: full fine-tuning "
                                       "keeps no frozen copy of it in this run (no KL, DPO or NFT anchor)")
                return evaluate(self.adapter, md, reward_fn, **kwargs)  # the live weights are still the base
            with self.adapter.reference():
                return evaluate(self.adapter, md, reward_fn, **kwargs)
        if use_ema and self.ema is not None:
            with self.ema.swapped():
                return evaluate(self.adapter, md, reward_fn, **kwargs)
        return evaluate(self.adapter, md, reward_fn, **kwargs)

    def _paired_heldout(self) -> dict | None:
        """:func:`flowrl.eval_report.paired_difference` of the held-out ``reward`` column, trained − base, per
        ``tag`` as well, from ``eval/{base,trained}/results.jsonl``; ``None`` when either file is missing."""
        base, trained = read_results(self.out / "eval" / "base"), read_results(self.out / "eval" / "trained")
        if not (base and trained):
            return None
        return paired_difference(base, trained, "reward", group_key="tag")

    def _main_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank under FSDP (collective), so that all ranks take the same branch; the flag
        itself otherwise."""
        if not self.fsdp:
            return flag
        return bool(self._gather(torch.tensor([int(flag)]))[0])

    def _log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def run(self) -> dict:
        """Train for ``trainer.epochs`` epochs, then evaluate base vs trained on the held-out prompts.

        Returns:
            ``{"base": summary, "trained": summary, "history": [...]}`` and, when both held-out evaluations wrote
            their records, ``"paired"``: the trained − base ``reward`` difference paired by prompt, with its
            standard error (:func:`flowrl.eval_report.paired_difference`, per ``tag`` under ``groups``).

        Raises:
            RuntimeError: if a reward is NaN/inf (after saving a checkpoint and the offending images).
        """
        from tqdm.auto import tqdm

        cfg, t = self.cfg, self.cfg.trainer
        history = self.history = []
        results: dict = {}
        start = 0
        ckpt = self.find_checkpoint(t.resume)
        if ckpt is not None:
            start, history = self.resume(ckpt)
            self.history = history
            if self.acc.is_main_process:
                print(f"resumed from {ckpt} at epoch {start}", flush=True)
        base_summary = self.out / "eval" / "base" / "summary.json"
        evaluates = self.acc.is_main_process or self.fsdp  # FSDP: every rank runs the evaluation's forwards
        if t.eval_base and evaluates:
            if ckpt is not None and self._main_flag(base_summary.is_file()):  # the base does not change: keep it
                if self.acc.is_main_process:
                    results["base"] = json.loads(base_summary.read_text())
            elif not (self.full_ft and getattr(self.adapter, "_frozen_reference", None) is None and self.opt_steps):
                results["base"] = self.evaluate_heldout("base", base=True)
            elif self.acc.is_main_process:
                print("base evaluation skipped: full fine-tuning resumed without a frozen copy of the base model and "
                      f"without {base_summary}", flush=True)
        bar = tqdm(range(start, t.epochs), desc=cfg.algorithm.name, disable=not self.acc.is_main_process,
                   initial=start, total=t.epochs)
        for epoch in bar:
            self.epoch = epoch
            t0 = time.time()
            # offline DPO trains on a pairs file: no rollout and no reward during training; DRaFT samples in its update
            batch = (None if self.dpo_pairs is not None or self.draft is not None or self.rpo is not None
                     else self.collect(epoch))  # RPO generates from its own subject prompts in its update
            t1 = time.time()
            draft_images = None
            if self.draft is not None:
                stats, draft_images = self.draft.update(epoch)
            elif self.rpo is not None:
                stats, draft_images = self.rpo.update(epoch)
            elif cfg.algorithm.name in ("nft", "raft"):
                stats = self.update_nft(batch["traj"], batch["cond"], batch["adv"], batch["sample_ids"], epoch)
            elif cfg.algorithm.name == "dpo":
                x_w, x_l, prompts, keys, n_pairs = (self.dpo_offline_pairs(epoch) if batch is None
                                                    else self.dpo_online_pairs(batch, epoch))
                stats = {**self.update_dpo(x_w, x_l, prompts, keys, epoch), "dpo_pairs": float(n_pairs)}
            else:
                stats = self.update(batch["traj"], batch["cond"], batch["adv"])
            t2 = time.time()
            log: dict[str, float] = {}
            if batch is not None:
                r_all = batch["rewards_all"]
                log.update({"reward/mean": float(r_all.mean()), "reward/std": float(r_all.std())})
            if self.draft is not None or self.rpo is not None:  # already namespaced: reward/*, train/draft_loss, ...
                log.update(stats)
            log.update({"train/kl": stats.get("kl", 0.0), "train/clipfrac": stats.get("clipfrac", 0.0),
                        "train/policy_loss": stats.get("policy_loss", 0.0), "train/ratio": stats.get("ratio", 1.0),
                        "train/approx_kl": stats.get("approx_kl", 0.0),
                        "train/first_ratio_max_dev": stats.get("first_ratio_max_dev", 0.0),
                        **{f"train/{k}": v for k, v in stats.items()
                           if k in ("nft_loss", "r", "v_old_err", "uncond_drift") or k.startswith("dpo_")}})
            if batch is not None:
                log.update({"train/informative_groups": batch["informative_frac"],
                            "train/groups": float(batch["groups"]), "train/rounds": float(batch["rounds"]),
                            "train/diversity": float(self._gather(torch.tensor([batch["diversity"]])).mean())})
            log.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1})
            cols = batch["cols"] if batch is not None else {}
            images = batch["images"] if batch is not None else draft_images
            for k, v in cols.items():
                if k != "reward":
                    log[f"reward/{k}"] = float(self._gather(torch.as_tensor(v)).mean())
            if batch is not None and len(self.tag_names) > 1:  # per-task training reward (GenEval tags)
                log.update(self._per_tag(cols["reward"], batch["tags"]))
            if self.grad_norms:
                log["train/grad_norm"] = float(np.mean(self.grad_norms))
                self.grad_norms = []
            history.append({"epoch": epoch, **log})
            self._log(log, epoch)
            if self.acc.is_main_process:  # written every epoch, so a stopped run keeps its curve
                with open(self.out / "history.jsonl", "a" if epoch > start else "w") as f:
                    f.write("".join(json.dumps(h) + "\n" for h in (history[-1:] if epoch > start else history)))
            bar.set_postfix(progress_postfix(cfg.algorithm.name, log))
            if (images is not None and self.acc.is_main_process and t.log_images_every
                    and epoch % t.log_images_every == 0):
                p = save_grid(images[: min(len(images), 32)], self.out / "images" / f"epoch_{epoch:04d}.png")
                if self.writer is not None:
                    from PIL import Image

                    self.writer.add_image("samples", np.asarray(Image.open(p)), epoch, dataformats="HWC")
            if t.save_every and (epoch + 1) % t.save_every == 0:
                self.save(f"epoch_{epoch + 1:04d}", epoch, history)
            if t.eval_every and (epoch + 1) % t.eval_every == 0 and epoch + 1 < t.epochs and evaluates:
                # (the last epoch's held-out evaluation is the final one below, not run twice)
                s = self.evaluate_heldout(f"epoch_{epoch + 1:04d}")
                self._log({"eval/overall": s["overall"]} if "overall" in s else {}, epoch)
            if self.rpo is not None and self.rpo.stop:  # RPO early stopping on its λ-Harmonic validation score
                break
        self.save("final", t.epochs - 1, history)
        trained = self.evaluate_heldout("trained") if evaluates else None
        if self.acc.is_main_process:
            results["trained"] = trained
            results["history"] = history
            (self.out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            if "base" in results:
                table = markdown_table({"base": results["base"], "trained (EMA)": results["trained"]})
                paired = self._paired_heldout()
                if paired:
                    results["paired"] = paired
                    table += ("\nHeld-out `reward` paired by prompt (same seeds; SE over prompts):\n\n"
                              + render_paired_markdown({"trained (EMA)": paired}, "base"))
                (self.out / "eval" / "comparison.md").write_text(table)
                kind = "strict GenEval-style" if "tasks" in results["base"] else f"reward={self.cfg.reward.name}"
                print(f"\nHeld-out evaluation ({kind}, ODE):\n" + table)
                if "overall" in results["base"]:
                    print(f"overall: base {results['base']['overall']:.4f} -> trained "
                          f"{results['trained']['overall']:.4f} "
                          f"({results['trained']['overall'] - results['base']['overall']:+.4f})"
                          + (f"; paired reward difference {paired['mean']:+.4f} ± {paired['se']:.4f} (z "
                             f"{paired['z']:+.1f}, {paired['n_prompts']} prompts)" if paired else ""))
            if self.writer is not None:
                self.writer.close()
        return results
