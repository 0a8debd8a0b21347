"""UNet ε-prediction adapter (Stable Diffusion 1.x / 2.x, what DDPO trains), exposed in the flow-matching frame.

flowrl's samplers (:mod:`flowrl.flow.sde`) work in the flow frame ``y_σ = (1-σ)·z + σ·ε`` with velocity
``v = ε - z``. A DDPM-family UNet works in the variance-preserving (VP) frame of a discrete schedule ``ᾱ_t``
(``t = 0 … T-1``): ``x_t = α_t·x0 + s_t·ε`` with ``α_t = sqrt(ᾱ_t)``, ``s_t = sqrt(1-ᾱ_t)``. This module maps one onto
the other so that the same trainer, samplers and log-probabilities train the UNet.

**The frame.** Let ``ᾱ_f`` be the *terminal* cumulative product: the ᾱ the last DDIM step of the pipeline lands on
(``terminal="scheduler"``, the default: the scheduler's ``final_alpha_cumprod`` — ``ᾱ_0 = 1 - β_0 = 0.99915`` for SD
with ``set_alpha_to_one=False``) or 1 (``terminal="clean"``). With ``α_f = sqrt(ᾱ_f)``, ``s_f = sqrt(1-ᾱ_f)``, write
the VP latent in terms of ``z = α_f·x0 + s_f·ε`` (the latent the pipeline ends on and decodes) and ``ε``::

    x_t = a_t·z + b_t·ε,    a_t = α_t/α_f,    b_t = s_t - α_t·s_f/α_f,    k_t = a_t + b_t
    y = x_t / k_t = (1-σ_t)·z + σ_t·ε,        σ_t = b_t / k_t,  i.e.  σ/(1-σ) = α_f·(s_t/α_t) - s_f

For ``terminal="clean"`` (``α_f = 1, s_f = 0``) this is the familiar ``σ = s_t/(α_t + s_t)``, ``y = x_t/(α_t+s_t)``,
``z = x0``. σ is increasing in ``t``; ``σ = 0`` is ``ᾱ_f`` (``t = 0`` for the default frame).

**Velocity.** The UNet's prediction (after CFG) is turned into ``ε̂`` (``prediction_type`` ``epsilon``: as is;
``v_prediction``: ``ε̂ = α_t·v̂ + s_t·x_t``; ``sample``: ``ε̂ = (x_t - α_t·x̂0)/s_t``) and then into the flow velocity
(:func:`eps_to_velocity`) ``v = (ε̂ - y)/(1-σ)``, which equals ``ε̂ - ẑ`` with ``ẑ = α_f·x̂0 + s_f·ε̂`` and
``x̂0 = (x_t - s_t·ε̂)/α_t``. Conversely ``ε̂ = y + (1-σ)·v`` (:func:`velocity_to_eps`). Both forms hold in either frame.

**Why the Euler ODE step is DDIM.** ``y' = y + (σ'-σ)·v = (1-σ')·ẑ + σ'·ε̂``; multiplied by ``k_{t'}`` this is
``α_{t'}·x̂0 + s_{t'}·ε̂``, exactly ``DDIMScheduler.step(..., eta=0)``. With ``terminal="scheduler"`` the last step
(``σ_{N-1} → 0``) lands on ``ẑ = α_f·x̂0 + s_f·ε̂`` = the pipeline's final latent (``prev_timestep < 0`` →
``final_alpha_cumprod``), so noise level 0 reproduces ``StableDiffusionPipeline(..., eta=0)`` step by step and the
decoded image. With ``terminal="clean"`` the last step lands on ``x̂0`` (DDIM with ``set_alpha_to_one=True``).

**The σ grid** (:meth:`UNetAdapter.sigmas`) is ``σ_{t_i}`` for the DDIM timesteps ``t_0 > … > t_{N-1}`` that
``DDIMScheduler.set_timesteps(N)`` produces, then 0. It does **not** start at 1: SD's "leading" spacing starts at
``t_0 = (N-1)·(T//N) + steps_offset`` (901 for N = 10, σ ≈ 0.894; 981 for N = 50, σ ≈ 0.929 in the clean frame).

**The first step.** The pipeline starts from pure noise ``x = ε ~ N(0, I)`` and *treats it as the VP latent at t_0*
(it is not the true marginal ``α_{t_0}·x0 + s_{t_0}·ε`` — SD's schedule never reaches zero SNR). The flow-frame
initial state is therefore ``y_0 = ε / k_{t_0}`` (std ``1/k_{t_0}`` ≈ 0.90 for N = 10), which is what
:meth:`UNetAdapter.initial_noise` returns; the UNet then sees ``k_{t_0}·y_0 = ε`` again. Because ``t_0`` depends on
the step count, so does the initial state: ``initial_noise`` uses the grid of the latest :meth:`sigmas` call (or an
explicit ``num_steps``) and :meth:`velocity` warns if it is later fed a trajectory scaled for another grid.

**σ → t.** On the scheduler's grid (σ equal, as float32, to ``σ_t`` for an integer ``t``) the UNet gets that integer
``t`` and the scheduler's own ``ᾱ_t`` — an exact inverse. Off the grid (forward-process draws of NFT / DPO), ``t`` is
interpolated linearly in ``log(s/α)`` between neighbouring integer timesteps (the UNet's sinusoidal embedding accepts
real ``t``) and ``ᾱ`` is computed from σ exactly, so the frame conversion stays exact; σ outside
``[σ_{t=0}, σ_{t=T-1}]`` is evaluated at the clamped ``t`` (0 or ``T-1``) with a one-time warning, and σ ≥ 1 is
refused (an ε-model has no data prediction at zero SNR).

**Model facts.** ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer);
any DDPM-family scheduler config is re-instantiated as ``DDIMScheduler`` (DDPO does the same; SD1.5 ships PNDM);
CFG is one UNet forward on ``[uncond; cond]`` with the empty negative prompt, guidance applied to the raw model
output as the pipeline does; VAE latents are ``z·scaling_factor`` (0.18215 for SD); LoRA targets the UNet attention
projections ``to_q, to_k, to_v, to_out.0`` (self- and cross-attention) and is saved with
``StableDiffusionPipeline.save_lora_weights`` so that ``load_lora_weights`` reads it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from flowrl.models.sd3 import BatchedTensors, PipelineFacts, attach_lora, resolve_model_path

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]

__all__ = ["UNetAdapter", "UNetPromptEmbeds", "LORA_TARGET_MODULES", "eps_to_velocity", "velocity_to_eps",
           "model_output_to_eps", "flow_coefficients", "alpha_prod_from_sigma"]


# --------------------------------------------------------------------------------------------------------------------
# Pure conversions (float64 for schedule values; tensors in, tensors out)
# --------------------------------------------------------------------------------------------------------------------

def flow_coefficients(alpha_prod, alpha_prod_final: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, k)`` of the VP latent at ``ᾱ`` in the flow frame anchored at ``ᾱ_f``: ``y = x_t / k``.

    ``a = α/α_f``, ``b = s - α·s_f/α_f``, ``k = a + b``, ``σ = b/k`` (module docstring). With ``ᾱ_f = 1``:
    ``σ = s/(α+s)``, ``k = α + s``.

    Args:
        alpha_prod: ``ᾱ`` values in ``(0, ᾱ_f]`` (tensor or number).
        alpha_prod_final: the terminal ``ᾱ_f`` in (0, 1].

    Returns:
        float64 tensors ``σ`` and ``k`` shaped like ``alpha_prod``.
    """
    ab = torch.as_tensor(alpha_prod, dtype=torch.float64)
    af, sf = math.sqrt(alpha_prod_final), math.sqrt(1 - alpha_prod_final)
    alpha, s = ab.sqrt(), (1 - ab).sqrt()
    a = alpha / af
    b = s - alpha * (sf / af)
    k = a + b
    return b / k, k


def alpha_prod_from_sigma(sigma, alpha_prod_final: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`flow_coefficients`: ``ᾱ`` of the flow level σ ∈ [0, 1).

    ``s/α = (σ/(1-σ) + s_f)/α_f =: ρ``, ``ᾱ = 1/(1 + ρ²)``. Returns float64.
    """
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    af, sf = math.sqrt(alpha_prod_final), math.sqrt(1 - alpha_prod_final)
    rho = (sig / (1 - sig) + sf) / af
    return 1 / (1 + rho**2)


def eps_to_velocity(eps: torch.Tensor, y: torch.Tensor, sigma) -> torch.Tensor:
    """Flow velocity from an ε-prediction: ``v = (ε̂ - y)/(1-σ)``.

    ``y = (1-σ)·ẑ + σ·ε̂`` defines the implied data prediction ``ẑ``; ``v = ε̂ - ẑ``. In the VP frame
    (``y = x_t/(α+s)``, ``σ = s/(α+s)``, clean terminal) this is ``ε̂ - x̂0`` with ``x̂0 = (x_t - s·ε̂)/α``.

    Args:
        eps: ``[B, ...]`` ε-prediction (after CFG). y: ``[B, ...]`` flow-frame state at σ.
        sigma: scalar or ``[B]`` flow level, σ < 1.

    Returns:
        ``[B, ...]`` float32 velocity.
    """
    y = y.float()
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    c = (1 / (1 - sig)).float().to(y.device).view(-1, *([1] * (y.ndim - 1)))
    return (eps.float() - y) * c


def velocity_to_eps(v: torch.Tensor, y: torch.Tensor, sigma) -> torch.Tensor:
    """ε-prediction from a flow velocity: ``ε̂ = y + (1-σ)·v`` (the inverse of :func:`eps_to_velocity`; CPS's ``x̂1``).

    Args:
        v: ``[B, ...]`` flow velocity. y: ``[B, ...]`` flow-frame state at σ. sigma: scalar or ``[B]``.

    Returns:
        ``[B, ...]`` float32 ε̂.
    """
    y = y.float()
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    c = (1 - sig).float().to(y.device).view(-1, *([1] * (y.ndim - 1)))
    return y + c * v.float()


def model_output_to_eps(out: torch.Tensor, x_t: torch.Tensor, alpha_prod, prediction_type: str) -> torch.Tensor:
    """ε̂ from a UNet output in the VP frame, as diffusers' ``DDIMScheduler.step`` derives ``pred_epsilon``.

    ``epsilon``: ``ε̂ = out``; ``v_prediction`` (``v̂ = α·ε - s·x0``): ``ε̂ = α·v̂ + s·x_t``;
    ``sample``: ``ε̂ = (x_t - α·x̂0)/s``.

    Args:
        out: ``[B, ...]`` model output (after CFG). x_t: ``[B, ...]`` the VP latent it was computed at.
        alpha_prod: scalar or ``[B]`` ``ᾱ_t``. prediction_type: the scheduler's ``prediction_type``.

    Raises:
        ValueError: unknown prediction type.
    """
    out, x_t = out.float(), x_t.float()
    ab = torch.as_tensor(alpha_prod, dtype=torch.float64).reshape(-1)
    shape = (-1, *([1] * (x_t.ndim - 1)))
    alpha = ab.sqrt().float().to(x_t.device).view(shape)
    s = (1 - ab).sqrt().float().to(x_t.device).view(shape)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha * out + s * x_t
    if prediction_type == "sample":
        return (x_t - alpha * out) / s
    raise ValueError(f"prediction_type={prediction_type!r}: expected 'epsilon', 'v_prediction' or 'sample'")


# --------------------------------------------------------------------------------------------------------------------
# Prompt embeddings
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class UNetPromptEmbeds(BatchedTensors):
    """Encoded prompts of the SD1.x/2.x family: ``prompt_embeds`` ``[B, L, D]`` (CLIP last hidden state, L = 77 for
    SD). Same interface as :class:`~flowrl.models.sd3.PromptEmbeds` (indexing, ``repeat_interleave``, ``cat``)."""

    prompt_embeds: torch.Tensor


def _check_unet_folder(path: str) -> None:
    """Clear error when a local folder holds another pipeline class (SD3, FLUX, SDXL)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls != "StableDiffusionPipeline":
        hint = {"StableDiffusion3Pipeline": " Use model.family=sd3.", "FluxPipeline": " Use model.family=flux."}
        raise ValueError(f"{path!r} holds a {cls or 'unknown'} checkpoint; UNetAdapter needs a StableDiffusionPipeline "
                         f"folder (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5).{hint.get(cls, '')}")


# --------------------------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------------------------

class UNetAdapter(PipelineFacts):
    """Velocity (flow frame), prompt encoding, σ grid and decoding for a ``diffusers.StableDiffusionPipeline``.

    Args:
        pipeline: a loaded ``StableDiffusionPipeline`` whose scheduler is a ``DDIMScheduler`` (see
            :meth:`from_pretrained`, which converts PNDM & co.) without ``clip_sample`` / ``thresholding``.
        dtype: compute dtype of the UNet and text encoder (the sampler maths is float32 regardless).
        terminal: ``"scheduler"`` (default): σ = 0 is the scheduler's ``final_alpha_cumprod``, so ODE sampling
            reproduces the pipeline including its last step; ``"clean"``: σ = 0 is ``ᾱ = 1`` (clean ``x0``), the
            standard map ``σ = s/(α+s)`` in which the forward process ``(1-σ)·x0 + σ·ε`` is exactly the VP marginal
            and DDIM-η steps are exactly CPS steps (:meth:`ddim_noise_levels`). Identical when
            ``set_alpha_to_one=True``.

    Raises:
        TypeError: the scheduler is not a ``DDIMScheduler``.
        ValueError: ``clip_sample`` / ``thresholding`` on (x̂0 clipping is not expressible in the flow frame), an
            unknown ``prediction_type`` or ``terminal``.
    """

    family = "unet"
    lora_target_modules = LORA_TARGET_MODULES
    denoiser_attr = "unet"  # the pipeline component that is trained (LoRA or full fine-tuning)

    def __init__(self, pipeline, dtype: torch.dtype = torch.float32,
                 terminal: Literal["scheduler", "clean"] = "scheduler"):
        from diffusers import DDIMScheduler

        sched = pipeline.scheduler
        if not isinstance(sched, DDIMScheduler):
            raise TypeError(f"UNetAdapter needs a DDIMScheduler, got {type(sched).__name__}; load with "
                            "UNetAdapter.from_pretrained or set pipeline.scheduler = DDIMScheduler.from_config(...)")
        if sched.config.clip_sample or sched.config.thresholding:
            raise ValueError("the DDIM scheduler clips / thresholds x̂0, which is not an affine map and has no "
                             "flow-frame equivalent; set clip_sample=False and thresholding=False (SD's configs do)")
        if sched.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r}")
        if terminal not in ("scheduler", "clean"):
            raise ValueError(f"terminal must be 'scheduler' or 'clean', got {terminal!r}")
        self.pipeline = pipeline
        self.dtype = dtype
        self.terminal = terminal
        self.prediction_type = sched.config.prediction_type
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.detach().double().cpu().clone()  # the scheduler's float32 values
        self.alpha_prod_final = float(sched.final_alpha_cumprod) if terminal == "scheduler" else 1.0
        sig, k = flow_coefficients(self.alphas_cumprod, self.alpha_prod_final)
        # σ_t for t = 0 … T-1: float32, strictly increasing (the on-grid lookup compares float32 values exactly)
        self._sigma_table = sig.float()
        self._scale_table = k
        self._log_rho = torch.log((1 - self.alphas_cumprod).sqrt() / self.alphas_cumprod.sqrt())
        if not bool((self._sigma_table[1:] > self._sigma_table[:-1]).all()):
            raise ValueError("the scheduler's σ_t is not strictly increasing in float32; cannot invert σ → t")
        self._negative: dict[int, UNetPromptEmbeds] = {}
        self._last_steps: int | None = None
        self._grid_starts: set[float] = set()
        self._noise_sigma0: float | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        max_sequence_length: int | None = None, load_t5: bool = False,
                        terminal: Literal["scheduler", "clean"] = "scheduler") -> "UNetAdapter":
        """Load with ``StableDiffusionPipeline.from_pretrained`` (no safety checker), convert the scheduler to
        ``DDIMScheduler.from_config`` (keeping betas, ``prediction_type``, ``steps_offset``, ``set_alpha_to_one``,
        ``timestep_spacing``; ``clip_sample`` False unless the config sets it), freeze every module.

        Args:
            path: local diffusers folder or hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``).
            max_sequence_length, load_t5: accepted (and ignored) so that the trainer can pass the same keywords to
                every family: the CLIP tokenizer fixes the length (77) and there is no T5.
            terminal: see :class:`UNetAdapter`.

        Raises:
            FileNotFoundError: a local path without ``model_index.json`` or an uncached hub id with
                ``HF_HUB_OFFLINE=1``.
            ValueError: the folder holds another pipeline class.
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        resolved = resolve_model_path(path)
        _check_unet_folder(resolved)
        pipe = StableDiffusionPipeline.from_pretrained(resolved, dtype=dtype, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
        if not isinstance(pipe.scheduler, DDIMScheduler):
            cfg = dict(pipe.scheduler.config)
            pipe.scheduler = DDIMScheduler.from_config(cfg, clip_sample=bool(cfg.get("clip_sample", False)))
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for m in (pipe.vae, pipe.text_encoder, pipe.unet):
            m.requires_grad_(False)
        return cls(pipe, dtype=dtype, terminal=terminal)

    # -- model facts ---------------------------------------------------------------------------------------------
    @property
    def transformer(self):
        """The denoiser (a ``UNet2DConditionModel``; named ``transformer`` for the trainer's family-agnostic code)."""
        return self.pipeline.unet

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def sigma_range(self) -> tuple[float, float]:
        """``(σ_{t=0}, σ_{t=T-1})``: the flow levels the UNet was trained on (0 and ≈0.936 for SD, default frame).
        Forward-process draws outside it are evaluated at a clamped timestep (see :meth:`timesteps`)."""
        return float(self._sigma_table[0]), float(self._sigma_table[-1])

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``[num_steps + 1]`` float32: ``σ_t`` of the DDIM timesteps of ``DDIMScheduler.set_timesteps(num_steps)``,
        then 0 (module docstring). Also makes this grid the one :meth:`initial_noise` scales for by default.

        Warns (once) if the scheduler's own ``step`` would not walk this chain (``t_i - T//N ≠ t_{i+1}``, or the last
        step not landing on the final ᾱ — possible with ``"trailing"``/``"linspace"`` spacing when N does not divide
        T): the flow sampler follows the listed timesteps, so it then differs from the diffusers pipeline.
        """
        ts = self.scheduler_timesteps(num_steps)
        ratio = self.num_train_timesteps // num_steps
        nxt = ts - ratio
        chain_ok = bool((nxt[:-1] == ts[1:]).all()) and int(nxt[-1]) < 0
        if not chain_ok and "chain" not in self._warned:
            warnings.warn(f"DDIMScheduler.step(t) goes to t - {ratio}, which is not the next listed timestep for "
                          f"{num_steps} steps with timestep_spacing={self.pipeline.scheduler.config.timestep_spacing!r}"
                          "; the flow-frame sampler follows the listed timesteps and will not match the pipeline",
                          stacklevel=2)
            self._warned.add("chain")
        grid = torch.cat([self._sigma_table[ts], torch.zeros(1)])
        self._last_steps = num_steps
        self._grid_starts.add(float(grid[0]))
        return grid.clone()

    def scheduler_timesteps(self, num_steps: int) -> torch.Tensor:
        """``[num_steps]`` int64 timesteps of ``DDIMScheduler.set_timesteps(num_steps)`` (the pipeline's)."""
        sched = self.pipeline.scheduler
        sched.set_timesteps(num_steps, device="cpu")
        return sched.timesteps.detach().cpu().long().clone()

    def timesteps(self, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet timestep and ``ᾱ`` of flow levels σ.

        On the grid (σ equal as float32 to ``σ_t``, integer ``t``): ``(t, alphas_cumprod[t])`` exactly. Off the grid:
        ``t`` linear in ``log(s/α)`` between the neighbouring integer timesteps, ``ᾱ`` from σ by
        :func:`alpha_prod_from_sigma` (so ``y·k`` is the exact VP latent). Outside ``sigma_range`` the timestep is
        clamped to ``[0, T-1]`` (warned once); ᾱ still follows σ.

        Args:
            sigma: scalar or ``[B]`` flow levels in ``[0, 1)``.

        Returns:
            ``(t [B] float32, ᾱ [B] float64)`` on the CPU.

        Raises:
            ValueError: σ < 0 or σ ≥ 1.
        """
        sig32 = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu().reshape(-1).contiguous()
        if bool((sig32 < 0).any()) or bool((sig32 >= 1).any()):
            raise ValueError("UNetAdapter needs flow levels 0 ≤ σ < 1 (an ε/v-model has no data prediction at σ = 1)")
        table = self._sigma_table
        n = table.shape[0]
        idx = torch.searchsorted(table, sig32).clamp(max=n - 1)
        on_grid = table[idx] == sig32
        t = idx.double()
        alpha_prod = self.alphas_cumprod[idx].clone()
        off = ~on_grid
        if bool(off.any()):
            s64 = sig32[off].double()
            ab = alpha_prod_from_sigma(s64, self.alpha_prod_final)
            log_rho = 0.5 * torch.log((1 - ab) / ab)
            hi = idx[off]
            lo = (hi - 1).clamp(min=0)
            lr_lo, lr_hi = self._log_rho[lo], self._log_rho[hi]
            w = torch.where(hi > lo, (log_rho - lr_lo) / (lr_hi - lr_lo).clamp_min(1e-30), torch.zeros_like(log_rho))
            t_off = lo.double() + w
            out_of_range = (t_off < 0) | (t_off > n - 1)
            if bool(out_of_range.any()) and "range" not in self._warned:
                lo_s, hi_s = self.sigma_range
                warnings.warn(f"UNetAdapter: flow levels outside the trained range [{lo_s:.4f}, {hi_s:.4f}] are "
                              "evaluated at the clamped timestep (0 or T-1)", stacklevel=3)
                self._warned.add("range")
            t[off] = t_off.clamp(0, n - 1)
            alpha_prod[off] = ab
        return t.float(), alpha_prod

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H/f, W/f)`` latents for ``height × width`` pixels.

        Raises:
            ValueError: size not a multiple of ``lcm(8, vae_scale_factor)`` (the pipeline's own check is 8).
        """
        f = math.lcm(8, self.vae_scale_factor)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this model, got {height}×{width}")
        return (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def frame_scale(self, sigma) -> torch.Tensor:
        """``[B]`` float64 ``k`` with ``x_t = k·y`` at flow level σ (the scheduler's ᾱ on the grid)."""
        _, ab = self.timesteps(sigma)
        return flow_coefficients(ab, self.alpha_prod_final)[1]

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int,
                      num_steps: int | None = None) -> torch.Tensor:
        """``[B, C, h, w]`` float32 flow-frame initial state ``y_0 = ε / k_{t_0}`` at ``σ_0 = sigmas(N)[0]``.

        ``ε`` is drawn exactly as the pipeline's ``prepare_latents`` (``randn_tensor`` with one generator per
        sample, times ``init_noise_sigma`` = 1 for DDIM), so ``k_{t_0}·y_0`` is the pipeline's first UNet input.

        Args:
            num_steps: the step count whose grid is sampled; default: that of the latest :meth:`sigmas` call.

        Raises:
            RuntimeError: no ``num_steps`` and :meth:`sigmas` never called.
        """
        from diffusers.utils.torch_utils import randn_tensor

        n = num_steps if num_steps is not None else self._last_steps
        if n is None:
            raise RuntimeError("UNetAdapter.initial_noise depends on the step count (σ_0 < 1 varies with it): call "
                               "sigmas(num_steps) first or pass num_steps")
        t0 = int(self.scheduler_timesteps(n)[0])
        sigma0 = float(self._sigma_table[t0])
        k0 = float(self._scale_table[t0])
        self._noise_sigma0 = sigma0
        self._grid_starts.add(sigma0)
        shape = (len(generators), *self.latent_shape(height, width))
        eps = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype).float()
        return eps * float(self.pipeline.scheduler.init_noise_sigma) / k0

    # -- prompts -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> UNetPromptEmbeds:
        """Encode prompts with the pipeline's ``encode_prompt`` (CLIP last hidden state, no CFG duplication)."""
        emb, _ = self.pipeline.encode_prompt(list(prompts), self.device, 1, False)
        return UNetPromptEmbeds(emb.to(self.dtype))

    def negative(self, batch: int) -> UNetPromptEmbeds:
        """The empty prompt (the pipeline's default negative prompt) encoded as a batch of ``batch``, cached per batch
        size (the text encoder's rounding depends on the batch size; CFG must match the pipeline)."""
        if batch not in self._negative:
            self._negative[batch] = self.encode([""] * batch)
        return self._negative[batch]

    # -- the model -----------------------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: UNetPromptEmbeds,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """Flow velocity ``v(y, σ)`` of the UNet, with classifier-free guidance.

        ``t, ᾱ = timesteps(σ)``; ``x_t = k·y``; one UNet forward on ``[uncond; cond]`` when ``guidance_scale > 1``
        (``out = out_u + g·(out_c - out_u)`` on the raw output, as ``StableDiffusionPipeline``), else a single
        conditional forward; ``ε̂ = model_output_to_eps(out)``; ``v = (ε̂ - y)/(1-σ)``.

        Args:
            x: ``[B, C, h, w]`` flow-frame latents at σ.
            sigma: ``[B]`` (or scalar) flow levels in ``[0, 1)``.
            cond: :class:`UNetPromptEmbeds` of the B samples.

        Returns:
            ``[B, C, h, w]`` float32 velocity (differentiable w.r.t. LoRA parameters when grad is enabled).
        """
        b = x.shape[0]
        sig = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu().reshape(-1)
        if sig.numel() == 1 and b > 1:
            sig = sig.expand(b).contiguous()
        self._check_initial_scale(sig)
        t, ab = self.timesteps(sig)
        _, k = flow_coefficients(ab, self.alpha_prod_final)
        view = (-1, *([1] * (x.ndim - 1)))
        y = x.float()
        x_t = y * k.float().to(y.device).view(view)
        x_in = x_t.to(self.dtype)
        t_dev = t.to(self.device)
        if guidance_scale > 1.0:
            neg = self.negative(b)
            out = self.unet(torch.cat([x_in, x_in]), torch.cat([t_dev, t_dev]),
                            encoder_hidden_states=torch.cat([neg.prompt_embeds, cond.prompt_embeds]),
                            return_dict=False)[0]
            out_u, out_c = out.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = self.unet(x_in, t_dev, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
        eps = model_output_to_eps(out.float(), x_t, ab, self.prediction_type)
        return eps_to_velocity(eps, y, sig)

    def _check_initial_scale(self, sig: torch.Tensor) -> None:
        if self._noise_sigma0 is None or "initial" in self._warned:
            return
        vals = {float(s) for s in sig.unique()}
        if any(v in self._grid_starts and v != self._noise_sigma0 for v in vals):
            warnings.warn("UNetAdapter: velocity at the first σ of a grid other than the one initial_noise scaled "
                          f"for (σ_0 = {self._noise_sigma0:.6f}); call sigmas(num_steps) before initial_noise, or pass "
                          "initial_noise(..., num_steps=N)", stacklevel=3)
            self._warned.add("initial")

    def ddim_noise_levels(self, eta, num_steps: int) -> torch.Tensor:
        """``[num_steps]`` CPS noise levels whose step std equals DDIM-η's (DDPO's policy: η = 1).

        DDIM's ``σ_t(η) = η·sqrt((1-ᾱ')/(1-ᾱ))·sqrt(1-ᾱ/ᾱ')`` in the VP frame is ``σ_t(η)/k'`` in the flow frame;
        CPS's std is ``σ'·sin(a·π/2)`` with ``σ'·k' = b'`` (``= s'`` for the clean frame), so
        ``a = (2/π)·asin(σ_t(η)/b')``. In the ``"clean"`` frame the CPS step with these levels *is* the DDIM-η step
        (mean and std; the last step to σ = 0 is deterministic in both). In the default ``"scheduler"`` frame this
        is only an approximation: the std matches but the mean differs by O(s_f·std²), the level is capped at 1 where
        DDIM's std exceeds ``b'`` (the step into ``t = 1``, where ``b'`` → 0), and the last step (to ``ᾱ_f``) is
        deterministic here but not in DDIM.

        Raises:
            ValueError: in the clean frame, η so large that ``σ_t(η) > s'`` (never for η ≤ 1).
        """
        from flowrl.flow.samplers import ddim_std

        ts = self.scheduler_timesteps(num_steps)
        ab_t = self.alphas_cumprod[ts]
        ab_p = torch.cat([ab_t[1:], torch.tensor([self.alpha_prod_final], dtype=torch.float64)])
        std = ddim_std(ab_t, ab_p, eta).double()
        sig_p, k_p = flow_coefficients(ab_p, self.alpha_prod_final)
        b_p = sig_p * k_p
        ratio = torch.where(b_p > 0, std / b_p.clamp_min(1e-30), torch.zeros_like(std))
        if self.terminal == "clean" and bool((ratio > 1 + 1e-6).any()):
            raise ValueError("DDIM η too large for a CPS step (σ_t(η) > s'); use η ≤ 1")
        return (2 / math.pi * torch.asin(ratio.clamp(0, 1))).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` latents at σ = 0 → ``[B, 3, H, W]`` float32 images in [0, 1] (as the pipeline:
        ``vae.decode(z / scaling_factor)``, then ``(img/2 + 0.5).clamp(0, 1)``)."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd: ``[B, C, h, w]`` latents → ``[B, 3, H, W]`` float32 images in [0, 1] whose
        gradients flow back to ``latents`` (the VAE's own weights are frozen). Used by differentiable-reward
        fine-tuning (DRaFT / ReFL, :mod:`flowrl.draft`)."""
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` images in [0, 1] → ``[B, C, H/f, W/f]`` float32 latents ``(z - shift)·scaling_factor``
        (posterior mean, or a posterior sample with ``generator``), the inverse of :meth:`decode`'s normalisation.

        In the default ``"scheduler"`` frame σ = 0 is the pipeline's final latent (ᾱ_f ≈ 0.99915) rather than clean
        data; an encoded image is used as that state (as the pipeline decodes its final latent as an image).

        Raises:
            ValueError: not ``[B, 3, H, W]``, values outside [0, 1], or a size :meth:`latent_shape` rejects.
        """
        self.check_images(images)
        vae = self.pipeline.vae
        dist = vae.encode(images.to(self.device, vae.dtype) * 2 - 1).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * vae.config.scaling_factor).float()

    # -- LoRA ----------------------------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, target_modules: list[str] | None = None,
                 init_seed: int = 0) -> list[torch.nn.Parameter]:
        """Attach a peft LoRA adapter (``"default"``, Gaussian A, zero B, scale ``alpha/rank``) to the UNet's attention
        projections; returns its trainable parameters. Names that do not exist in a UNet (e.g. SD3's ``add_q_proj``
        in the trainer's default list) are ignored as long as one name matches.

        Raises:
            ValueError (from peft): no module matches.
        """
        targets = list(target_modules or self.lora_target_modules)
        names = {n.rsplit(".", 1)[-1] for n, _ in self.unet.named_modules()} | {
            ".".join(n.split(".")[-2:]) for n, _ in self.unet.named_modules()}
        present = [m for m in targets if m in names]
        return attach_lora(self.unet, rank, alpha, present or targets, init_seed)

    def save_lora(self, directory: str | os.PathLike) -> None:
        """Save the LoRA so that ``StableDiffusionPipeline.load_lora_weights(directory)`` loads it (adapter config as
        safetensors metadata, so the scale ``alpha/rank`` is restored)."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet)
        meta = self.unet.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
