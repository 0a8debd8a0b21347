"""Differentiable-reward fine-tuning of flow models: DRaFT-K, DRaFT-LV and ReFL (``algorithm=draft``).

No likelihood, no groups, no advantages: the reward itself is differentiated. For a prompt ``c`` and initial noise
``x_1 ~ N(0, I)`` the policy's image is the deterministic ODE sample (the same Euler sampler as evaluation, CFG
``sampler.guidance_scale``, ``sampler.train_steps`` steps of the adapter's σ grid) decoded by the VAE, and the loss is
``-s · mean_i r(decode(x_0^i), c_i)`` with ``s = algorithm.draft_reward_scale``, averaged over the global batch.
Only the LoRA weights are trained; the base transformer, the VAE, the text encoders and the reward model are frozen
(gradients pass *through* them to the LoRA).

- **DRaFT-K** (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", arXiv
  2309.17400, Alg. 1 with truncated back-propagation, §4.2): the first ``T - K`` steps run without gradients; the
  last ``K`` steps (``algorithm.draft_k``), the decoder and the reward run with gradients, so the gradient is that of
  the reward through the last K sampler steps, with ``x_{σ_{T-K}}`` treated as a constant. DRaFT-1 is K = 1.
- **DRaFT-LV** (same paper, §4.3; K = 1 only, ``algorithm.draft_lv_samples = n``): the final clean latent ``x_0``
  (detached) is re-noised ``n`` times to the last step's level, ``x' = (1-σ)·x_0 + σ·ε_j`` with ``σ = σ_{T-1}``, and
  each ``x'`` is denoised by the last step with gradients; a sample's reward is the mean over its own image and the
  ``n`` re-noised ones (a lower-variance gradient estimate for the price of ``n`` more decoder/reward passes).
- **ReFL** (Xu et al. 2023, "ImageReward", arXiv 2304.05977, Alg. 1, ``algorithm.draft_mode=refl``): no gradients
  down to a step index ``t`` drawn uniformly per sample from ``[lo, hi)`` = ``algorithm.refl_step_range``, then one
  velocity prediction with gradients and the one-step data prediction ``x̂_0 = x_t - σ_t·v(x_t, σ_t)`` (flow matching,
  REFERENCE §1) is decoded and scored. ``t = T-1`` is exactly DRaFT-1's gradient path. The ImageReward paper maps
  the reward through ``ReLU(2 - r)`` and mixes in a pre-training loss; here the loss is ``-s·r`` as in DRaFT.

Every random draw is seeded per sample from ``(trainer.seed, epoch, sample index)`` (initial noise as the trainer's
rollouts; ReFL's step and DRaFT-LV's noises from their own offsets), so the update depends neither on the number of
ranks nor on the micro-batch size. Gradients are accumulated over micro-batches of ``trainer.micro_batch`` samples;
each of the ``trainer.optimizer_steps_per_epoch`` optimizer steps divides its summed loss by the global number of
its samples (all ranks) and goes through :meth:`flowrl.trainer.Trainer._optimizer_step` (all-reduce, clipping, EMA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowrl.config import ConfigError
from flowrl.evaluation import to_uint8
from flowrl.flow.sde import sde_step
from flowrl.rewards import DIFFERENTIABLE_REWARDS, check_reward_output, is_differentiable, load_reward

DRAFT_LV_SEED_OFFSET = 1 << 43  # seeds of DRaFT-LV's re-noising draws
REFL_SEED_OFFSET = 1 << 44  # seeds of ReFL's stopping step


@dataclass
class DraftOutput:
    """The differentiable end of a DRaFT / ReFL sample.

    Attributes:
        images: ``[(1 + n)·B, 3, H, W]`` float32 in [0, 1] carrying the autograd graph: the B samples' images, then
            (DRaFT-LV) ``n`` blocks of B re-noised images (block ``j`` row ``i`` belongs to sample ``i``).
        final: ``[B, C, h, w]`` float32 clean latents of the B samples (with graph).
    """

    images: torch.Tensor
    final: torch.Tensor


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, sigma_max: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE, ``x' = x + v·(σ_next - σ)`` (REFERENCE §1), computed by the very
    function evaluation sampling uses (:func:`flowrl.flow.sde.sde_step` at noise level 0, zero noise), so a
    DRaFT sample is bit-identical to the evaluation policy's. Differentiable in ``x`` and ``v``.

    Args:
        x, v: ``[B, ...]`` sample at σ and its (guided) velocity. sigma, sigma_next: scalars or ``[B]``.
        sigma_max: the σ grid's second entry (only used by the SDE's σ = 1 special case, inert at noise level 0).

    Returns:
        ``[B, ...]`` float32 sample at σ_next.
    """
    return sde_step(x, v, sigma, sigma_next, 0.0, sigma_max=sigma_max, noise=torch.zeros_like(x, dtype=torch.float32)
                    ).prev_sample


def _cat_cond(cond, n: int):
    return cond if n == 1 else type(cond).cat([cond] * n)


def draft_forward(adapter, cond, x_init: torch.Tensor, sigmas: torch.Tensor, guidance_scale: float, k: int,
                  lv_noise: torch.Tensor | None = None) -> DraftOutput:
    """DRaFT-K forward pass (Clark et al. 2023, arXiv 2309.17400, Alg. 1 / §4.2–4.3): ODE sampling with gradients
    through the last ``k`` steps only, then decoding with gradients.

    Args:
        adapter: a model adapter with ``velocity(x, σ, cond, g)`` and ``decode_with_grad`` (e.g.
            :class:`~flowrl.models.sd3.SD3Adapter`); its LoRA is what receives gradients.
        cond: prompt embeddings of the B samples (indexable, with ``type(cond).cat``).
        x_init: ``[B, C, h, w]`` initial noise at σ = 1.
        sigmas: ``[T+1]`` decreasing σ grid ending at 0 (``adapter.sigmas(T)``).
        guidance_scale: CFG scale of every step (the evaluation policy's).
        k: steps with gradients, ``1 ≤ k ≤ T``; steps ``0 .. T-k-1`` run under ``torch.no_grad``.
        lv_noise: DRaFT-LV only (``k = 1``): ``[n, B, C, h, w]`` standard normal draws; each re-noises the detached
            final latent to ``σ_{T-1}`` and is denoised by the last step with gradients.

    Returns:
        :class:`DraftOutput` (``images`` ``[(1+n)·B, 3, H, W]``).

    Raises:
        ValueError: ``k`` outside ``[1, T]``, or ``lv_noise`` with ``k ≠ 1`` or of the wrong shape.
    """
    t_steps = sigmas.shape[0] - 1
    if not 1 <= k <= t_steps:
        raise ValueError(f"draft_k={k} must be in [1, {t_steps}] for {t_steps} sampler steps")
    if lv_noise is not None and (k != 1 or tuple(lv_noise.shape[1:]) != tuple(x_init.shape)):
        raise ValueError(f"DRaFT-LV needs k = 1 and noise [n, {', '.join(map(str, x_init.shape))}], got k={k}, "
                         f"{tuple(lv_noise.shape)}")
    b, smax = x_init.shape[0], float(sigmas[1])
    x = x_init.float()
    with torch.no_grad():
        for i in range(t_steps - k):
            v = adapter.velocity(x, sigmas[i].expand(b), cond, guidance_scale)
            x = euler_step(x, v, sigmas[i], sigmas[i + 1], smax)
    for i in range(t_steps - k, t_steps):
        v = adapter.velocity(x, sigmas[i].expand(b), cond, guidance_scale)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1], smax)
    final = x
    latents = [final]
    if lv_noise is not None and lv_noise.shape[0] > 0:
        n, s = lv_noise.shape[0], sigmas[t_steps - 1]
        x0 = final.detach()
        x_s = torch.cat([(1 - s) * x0 + s * lv_noise[j].to(x0) for j in range(n)])
        v = adapter.velocity(x_s, s.expand(n * b), _cat_cond(cond, n), guidance_scale)
        latents.append(euler_step(x_s, v, s, sigmas[t_steps], smax))
    return DraftOutput(images=adapter.decode_with_grad(torch.cat(latents)), final=final)


def refl_forward(adapter, cond, x_init: torch.Tensor, sigmas: torch.Tensor, guidance_scale: float,
                 stop_steps: torch.Tensor) -> DraftOutput:
    """ReFL forward pass (Xu et al. 2023, ImageReward, arXiv 2304.05977, Alg. 1): ODE sampling without gradients down
    to step index ``t_i`` of each sample, then one velocity prediction with gradients and the one-step data
    prediction ``x̂_0 = x_t - σ_t·v(x_t, σ_t)``, decoded with gradients.

    Args:
        adapter, cond, x_init, sigmas, guidance_scale: as :func:`draft_forward`.
        stop_steps: ``[B]`` integer step indices ``t_i ∈ [0, T)``: sample ``i`` stops at ``σ_{t_i}`` (``t = T-1`` is
            DRaFT-1's last step; ``t = 0`` predicts from pure noise).

    Returns:
        :class:`DraftOutput` with ``final`` = ``x̂_0`` ``[B, C, h, w]``.

    Raises:
        ValueError: a stop step outside ``[0, T)`` or a length other than B.
    """
    t_steps, b = sigmas.shape[0] - 1, x_init.shape[0]
    stop = torch.as_tensor(stop_steps, dtype=torch.long).reshape(-1).cpu()
    if stop.shape[0] != b or bool(((stop < 0) | (stop >= t_steps)).any()):
        raise ValueError(f"stop_steps must be {b} step indices in [0, {t_steps}), got {stop.tolist()}")
    smax = float(sigmas[1])
    x = x_init.float().clone()
    with torch.no_grad():
        for i in range(int(stop.max()) if b else 0):
            rows = torch.nonzero(stop > i).flatten()
            xr = x[rows.to(x.device)]
            v = adapter.velocity(xr, sigmas[i].expand(len(rows)), cond[rows], guidance_scale)
            x[rows.to(x.device)] = euler_step(xr, v, sigmas[i], sigmas[i + 1], smax)
    sig = sigmas[stop].float()
    v = adapter.velocity(x, sig, cond, guidance_scale)
    x0 = x - sig.to(x.device).view(-1, *([1] * (x.ndim - 1))) * v
    return DraftOutput(images=adapter.decode_with_grad(x0), final=x0)


class DraftUpdater:
    """The ``algorithm=draft`` epoch of a :class:`flowrl.trainer.Trainer`: DRaFT-K / DRaFT-LV / ReFL on this rank's
    share of the epoch's prompts (:func:`flowrl.trainer.make_epoch`: ``groups_per_epoch`` prompts ×
    ``group_size`` samples; the groups only decide which prompts are drawn).

    Raises (at construction):
        flowrl.config.ConfigError: the loaded reward has no ``differentiable`` method, or the adapter cannot decode
            with gradients.
        KeyError / ImportError: ``algorithm.draft_eval_reward`` cannot be loaded.
    """

    def __init__(self, trainer):
        self.tr = trainer
        cfg, a = trainer.cfg, trainer.cfg.algorithm
        if not is_differentiable(trainer.reward_fn):
            raise ConfigError(f"algorithm=draft needs a differentiable reward; reward={cfg.reward.name} has no "
                              f"differentiable(images, prompts, metadata). Use one of {', '.join(DIFFERENTIABLE_REWARDS)}"
                              ", e.g. reward=clip_score")
        if not callable(getattr(trainer.adapter, "decode_with_grad", None)):
            raise ConfigError(f"algorithm=draft decodes with gradients, which the {type(trainer.adapter).__name__} "
                              "adapter cannot do (no decode_with_grad)")
        self.eval_reward = None
        if a.draft_eval_reward:
            self.eval_reward = load_reward(a.draft_eval_reward, **dict(a.draft_eval_reward_args or {}))
        if cfg.model.gradient_checkpointing:  # the decoder's activations dominate DRaFT's memory at high resolution
            vae = getattr(trainer.adapter.pipeline, "vae", None)
            if vae is not None and getattr(vae, "_supports_gradient_checkpointing", False):
                vae.enable_gradient_checkpointing()

    def _noise(self, sample_ids: list[int], epoch: int, shape: tuple[int, ...], n: int) -> torch.Tensor:
        """DRaFT-LV draws ``[n, B, *shape]`` (standard normal), one generator per sample."""
        from flowrl.trainer import sample_seed

        seed = self.tr.cfg.trainer.seed
        per = [torch.randn((n, *shape), generator=torch.Generator().manual_seed(
            sample_seed(seed, epoch, DRAFT_LV_SEED_OFFSET + i))) for i in sample_ids]
        return torch.stack(per, 1)

    def stop_steps(self, sample_ids: list[int], epoch: int) -> torch.Tensor:
        """ReFL's stopping step of each sample, uniform in ``refl_step_range`` ``[lo, hi)``, seeded per sample:
        ``[B]`` long."""
        from flowrl.trainer import sample_seed

        lo, hi = (int(v) for v in self.tr.cfg.algorithm.refl_step_range)
        return torch.tensor([lo + int(torch.randint(hi - lo, (1,), generator=torch.Generator().manual_seed(
            sample_seed(self.tr.cfg.trainer.seed, epoch, REFL_SEED_OFFSET + i)))) for i in sample_ids],
                            dtype=torch.long)

    def update(self, epoch: int) -> tuple[dict[str, float], np.ndarray]:
        """One epoch: sample, differentiate the reward, step the optimizer ``trainer.optimizer_steps_per_epoch`` times.

        Returns:
            ``(stats, images)``: ``reward/mean`` and ``reward/std`` of the differentiable reward over all ranks'
            samples (before the optimizer step that used them; with DRaFT-LV the mean over each sample's images),
            ``train/draft_loss`` (``-s·mean reward``), ``train/refl_step`` (ReFL: mean stopping step), ``reward/<col>``
            for the extra columns of the reward's ``__call__`` on the same images rounded to uint8 (or of
            ``algorithm.draft_eval_reward``, whose ``reward`` column is logged as ``reward/<its name>``),
            ``reward/tag/<tag>`` per GenEval tag; and this rank's uint8 images ``[n, H, W, 3]``.
        """
        from flowrl.trainer import make_epoch, sample_seed

        tr, cfg = self.tr, self.tr.cfg
        a, t, adapter = cfg.algorithm, cfg.trainer, self.tr.adapter
        rank, world = tr.acc.process_index, tr.acc.num_processes
        eb = make_epoch(cfg, tr.train_md, epoch, rank, world)
        n, mb, res = len(eb.prompts), t.micro_batch, cfg.model.resolution
        n_lv = a.draft_lv_samples if a.draft_mode == "draft" else 0
        rewards = torch.zeros(n)
        steps = torch.zeros(n)
        images: list[np.ndarray] = []
        cols: list[dict[str, np.ndarray]] = []
        cache: dict[str, object] = {}
        for part in np.array_split(np.arange(n), t.optimizer_steps_per_epoch):
            count = tr._gather(torch.tensor([len(part)])).sum().item()  # samples of this optimizer step, all ranks
            if count == 0:
                continue
            scale = world / count
            for j in range(0, len(part), mb):
                ids = [int(q) for q in part[j : j + mb]]
                prompts, md = [eb.prompts[q] for q in ids], [eb.metadata[q] for q in ids]
                sids = [eb.sample_ids[q] for q in ids]
                uniq = [p for p in dict.fromkeys(prompts) if p not in cache]
                if uniq:
                    enc = adapter.encode(uniq)
                    cache.update({p: enc[q : q + 1] for q, p in enumerate(uniq)})
                cond = type(cache[prompts[0]]).cat([cache[p] for p in prompts])
                gens = [torch.Generator().manual_seed(sample_seed(t.seed, epoch, i)) for i in sids]
                sigmas = adapter.sigmas(cfg.sampler.train_steps)  # also sets the UNet family's x_T scale
                x = adapter.initial_noise(gens, res, res)
                if a.draft_mode == "refl":
                    stop = self.stop_steps(sids, epoch)
                    out = refl_forward(adapter, cond, x, sigmas, cfg.sampler.guidance_scale, stop)
                    steps[ids] = stop.float()
                else:
                    lv = self._noise(sids, epoch, tuple(x.shape[1:]), n_lv).to(x.device) if n_lv else None
                    out = draft_forward(adapter, cond, x, sigmas, cfg.sampler.guidance_scale, a.draft_k, lv)
                r = tr.reward_fn.differentiable(out.images, prompts * (1 + n_lv), md * (1 + n_lv)).float()
                r = r.reshape(1 + n_lv, len(ids)).mean(0)
                tr._backward(-(a.draft_reward_scale * r).sum() * scale)
                with torch.no_grad():
                    rewards[ids] = r.detach().cpu()
                    imgs = to_uint8(out.images[: len(ids)].detach())
                    scorer = self.eval_reward or tr.reward_fn
                    name = a.draft_eval_reward or cfg.reward.name
                    cols.append(check_reward_output(scorer(imgs, prompts, md), len(imgs), name))
                    images.append(imgs)
            tr._optimizer_step()
        r_all = tr._gather(rewards.float())
        stats = {"reward/mean": float(r_all.mean()), "reward/std": float(r_all.std()) if len(r_all) > 1 else 0.0,
                 "train/draft_loss": float(-a.draft_reward_scale * r_all.double().mean())}
        if a.draft_mode == "refl":
            stats["train/refl_step"] = float(tr._gather(steps).mean())
        for k in (cols[0] if cols else {}):
            if k == "reward" and self.eval_reward is None:
                continue  # the differentiable reward itself: reward/mean
            v = np.concatenate([c[k] for c in cols])
            key = f"reward/{a.draft_eval_reward}" if k == "reward" else f"reward/{k}"
            stats[key] = float(tr._gather(torch.as_tensor(v, dtype=torch.float32)).mean())
        if len(tr.tag_names) > 1:
            stats.update(tr._per_tag(rewards.numpy(), [m.get("tag", "") for m in eb.metadata]))
        return stats, (np.concatenate(images) if images else np.zeros((0, res, res, 3), np.uint8))
