"""FLUX.1 adapter: everything flowrl needs to know about ``diffusers.FluxPipeline`` checkpoints, and nothing more.

Model-specific facts owned here (upstream source: ``diffusers/pipelines/flux/pipeline_flux.py`` and
``diffusers/models/transformers/transformer_flux.py``, diffusers 0.42):

- **Latent layout.** flowrl keeps FLUX latents *unpacked*, ``[B, C, h, w]`` with ``C = in_channels / 4`` (16 for
  FLUX.1) and ``h, w = H/8, W/8`` (even), so trajectories, the step functions and the trainer see the same kind of
  tensor as for SD3. Packing into ``[B, (h/2)·(w/2), 4·C]`` tokens of 2×2 patches happens inside :meth:`velocity`
  with the pipeline's own ``_pack_latents`` / ``_unpack_latents`` static helpers. Packing is a pure permutation, so an
  element-wise sampler step gives bit-identical results in either layout.
- **Position ids.** Image tokens get ``(0, row, col)`` ids from the pipeline's ``_prepare_latent_image_ids``; text
  tokens get zeros ``[L, 3]`` (as ``FluxPipeline.encode_prompt`` returns them).
- **Timestep.** The transformer takes ``σ`` (it multiplies by 1000 itself); the pipeline feeds
  ``(σ·1000)/1000`` and so does this adapter, for bit-identical inputs.
- **Guidance.** FLUX.1-dev is guidance-distilled: ``guidance_scale`` is a *conditioning input* (the transformer's
  guidance embedding, ``guidance_embeds=True``), one forward per step, no negative prompt. Checkpoints without that
  embedding (FLUX.1-schnell) ignore it, as the pipeline does. Optional *true* CFG (``true_cfg_scale > 1`` with a
  negative prompt) runs a second, separate forward on the negative prompt and returns
  ``v_neg + s·(v_cond - v_neg)``, in the pipeline's order.
- **σ grid.** ``linspace(1, 1/N, N)`` shifted by the scheduler's exponential time shift with
  ``mu = calculate_shift(image tokens, base_image_seq_len, max_image_seq_len, base_shift, max_shift)`` (the pipeline's
  function), then a final 0 — so the grid depends on the image resolution (see :meth:`FluxAdapter.sigmas`).
- **Text.** ``encode_prompt``: CLIP-L's pooled output ``[B, 768]`` → ``pooled_projections``; T5-XXL token features
  ``[B, L, 4096]`` (``L = max_sequence_length``, 512 for FLUX.1-dev) → ``encoder_hidden_states``. T5 is required.
- **VAE.** ``z / scaling_factor + shift_factor`` before decoding (0.3611 / 0.1159 for FLUX.1).
- **LoRA.** peft adapter on the attention projections of the double-stream blocks (``to_q/k/v``, ``to_out.0``,
  ``add_q/k/v_proj``, ``to_add_out``) and single-stream blocks (``to_q/k/v``); saved with
  ``FluxPipeline.save_lora_weights`` so that ``FluxPipeline.load_lora_weights`` reads it.

Velocity convention (the one :mod:`flowrl.flow.sde` expects): ``v ≈ ε - x0`` and the Euler step is
``x_{σ_next} = x_σ + (σ_next - σ)·v``, exactly ``FlowMatchEulerDiscreteScheduler.step``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from flowrl.models.sd3 import PipelineFacts, PromptEmbeds, resolve_model_path

# Attention projections of FluxTransformerBlock (all eight) and FluxSingleTransformerBlock (to_q/k/v; its output
# projection is the fused `proj_out`, not targeted). Same names as the SD3 adapter's, hence ModelConfig's default.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

__all__ = ["FluxAdapter", "LORA_TARGET_MODULES", "PromptEmbeds"]


def _check_flux_folder(path: str) -> None:
    """Raise a clear error when a local diffusers folder holds another pipeline class than FLUX text-to-image."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls != "FluxPipeline":
        hint = " Use model.family=sd3 for it." if "StableDiffusion3" in cls else ""
        raise ValueError(f"{path!r} holds a {cls or 'unknown'} checkpoint; FluxAdapter needs a FluxPipeline folder "
                         f"(e.g. black-forest-labs/FLUX.1-dev).{hint}")


class FluxAdapter(PipelineFacts):
    """Velocity, prompt encoding, σ grid and decoding for a ``diffusers.FluxPipeline`` (FLUX.1-dev, -schnell, ...).

    Args:
        pipeline: a loaded ``diffusers.FluxPipeline``.
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev: 512; schnell: 256; the pipeline allows ≤ 512).
        dtype: compute dtype of the transformer and text encoders (the sampler maths is float32 regardless).
        resolution: default image side in pixels used by :meth:`sigmas` for the resolution-dependent shift when no
            ``height``/``width`` is given; ``None`` → the pipeline's default
            (``default_sample_size × vae_scale_factor``, 1024 for FLUX.1).
        true_cfg_scale: > 1 enables true classifier-free guidance against ``negative_prompt`` (two forwards per step,
            on top of the guidance embedding); 1 (default) is FLUX.1-dev's normal single-forward sampling.
        negative_prompt: the negative prompt of true CFG (FluxPipeline has no default; flowrl uses the empty prompt).

    Raises:
        ValueError: if ``true_cfg_scale < 1``.
    """

    family = "flux"
    lora_target_modules = LORA_TARGET_MODULES
    denoiser_attr = "transformer"  # the pipeline component that is trained (LoRA or full fine-tuning)

    def __init__(self, pipeline, max_sequence_length: int = 512, dtype: torch.dtype = torch.float32,
                 resolution: int | None = None, true_cfg_scale: float = 1.0, negative_prompt: str = ""):
        if true_cfg_scale < 1:
            raise ValueError(f"true_cfg_scale must be ≥ 1 (1 disables true CFG), got {true_cfg_scale}")
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.dtype = dtype
        self.resolution = int(resolution or pipeline.default_sample_size * pipeline.vae_scale_factor)
        self.true_cfg_scale = float(true_cfg_scale)
        self.negative_prompt = negative_prompt
        self._negative: dict[int, PromptEmbeds] = {}
        self._shift_tokens: int | None = None  # image tokens the last σ grid was shifted for (see velocity)
        self._warned_shift = False

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        max_sequence_length: int = 512, load_t5: bool = True, resolution: int | None = None,
                        true_cfg_scale: float = 1.0, negative_prompt: str = "") -> "FluxAdapter":
        """Load with ``FluxPipeline.from_pretrained`` (as for ``black-forest-labs/FLUX.1-dev``) and freeze it.

        Args:
            path: local diffusers folder or hub id.
            load_t5: must be True — FLUX's transformer reads the T5 tokens as its whole text sequence (accepted so
                that the trainer can pass ``model.load_t5`` uniformly for every family).
            Others: see :class:`FluxAdapter`.

        Raises:
            FileNotFoundError: for a local path without ``model_index.json``, or a hub id missing from the cache when
                ``HF_HUB_OFFLINE=1``.
            ValueError: if the folder holds another pipeline class (e.g. SD3), or ``load_t5`` is False.
        """
        from diffusers import FluxPipeline

        if not load_t5:
            raise ValueError("FLUX needs its T5 encoder (the transformer's text tokens come from T5 only); "
                             "set model.load_t5=true")
        try:
            resolved = resolve_model_path(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. For FLUX.1 give a FluxPipeline folder or a hub id such as "
                                    "black-forest-labs/FLUX.1-dev.") from e
        _check_flux_folder(resolved)
        pipe = FluxPipeline.from_pretrained(resolved, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
            m.requires_grad_(False)
        return cls(pipe, max_sequence_length=max_sequence_length, dtype=dtype, resolution=resolution,
                   true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt)

    # -- model facts (transformer, device, vae_scale_factor: PipelineFacts; one packed token covers
    #    2·vae_scale_factor pixels a side) -----------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H/f, W/f)`` of the unpacked latents for ``height × width`` pixels (``f`` = ``vae_scale_factor``).

        Raises:
            ValueError: if the size is not a multiple of ``2·vae_scale_factor`` (16 for FLUX.1), which the 2×2 packing
                needs (the pipeline would silently round the size down instead).
        """
        f = 2 * self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this model, got {height}×{width}")
        c = self.transformer.config.in_channels // 4
        return (c, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def image_tokens(self, height: int, width: int) -> int:
        """Number of packed image tokens ``(h/2)·(w/2)`` (4096 for 1024×1024 on FLUX.1)."""
        _, h, w = self.latent_shape(height, width)
        return (h // 2) * (w // 2)

    def mu(self, height: int, width: int) -> float:
        """The dynamic-shift parameter of the pipeline: ``calculate_shift`` of the image-token count with the
        scheduler's ``base_image_seq_len`` / ``max_image_seq_len`` / ``base_shift`` / ``max_shift`` (a line through
        (256, 0.5) and (4096, 1.15) for FLUX.1, so μ = 1.15 at 1024² and 0.63 at 512²)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipeline.scheduler.config
        return calculate_shift(self.image_tokens(height, width), cfg.get("base_image_seq_len", 256),
                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                               cfg.get("max_shift", 1.15))

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``[num_steps + 1]`` float32 σ grid for ``height × width`` images (default: ``self.resolution`` square),
        computed by the pipeline's scheduler exactly as ``FluxPipeline.__call__`` does; starts at 1, ends at 0.

        The grid depends on the resolution (through μ), so it must be computed for the size that is sampled;
        :meth:`velocity` warns once if it is fed latents of another size than the last grid was made for.
        """
        height = height or self.resolution
        width = width or self.resolution
        sched = self.pipeline.scheduler
        mu = self.mu(height, width)
        if getattr(sched.config, "use_flow_sigmas", False):
            sched.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
        self._shift_tokens = self.image_tokens(height, width)
        return sched.sigmas.detach().float().cpu().clone()

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """``[B, C, h, w]`` float32 unpacked initial latents, sample ``i`` drawn from ``generators[i]`` exactly as the
        pipeline's ``prepare_latents`` draws them (before it packs them)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (len(generators), *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype).float()

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → ``[B, (h/2)·(w/2), 4·C]`` packed tokens (the pipeline's ``_pack_latents``)."""
        b, c, h, w = latents.shape
        return self.pipeline._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[B, (h/2)·(w/2), 4·C]`` packed tokens → ``[B, C, h, w]`` (the pipeline's ``_unpack_latents``;
        ``h, w`` in latent cells)."""
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(tokens, h * f, w * f, f)

    # -- prompts -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode prompts with the pipeline's ``encode_prompt`` (CLIP pooled + T5 tokens; the same text for both).

        Returns:
            :class:`~flowrl.models.sd3.PromptEmbeds` with ``prompt_embeds`` ``[B, L, D_t5]`` (T5 token features,
            ``L = max_sequence_length``) and ``pooled`` ``[B, D_clip]`` (CLIP pooled output), in ``self.dtype``.
        """
        emb, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(emb.to(self.dtype), pooled.to(self.dtype))

    def negative(self, batch: int) -> PromptEmbeds:
        """The negative prompt of true CFG encoded as a batch of ``batch`` copies (cached per batch size), as the
        pipeline encodes a list of negative prompts — batch size changes the encoders' rounding."""
        if batch not in self._negative:
            self._negative[batch] = self.encode([self.negative_prompt] * batch)
        return self._negative[batch]

    # -- the model -----------------------------------------------------------------------------------------------
    def _forward(self, tokens, timestep, guidance, emb: PromptEmbeds, img_ids) -> torch.Tensor:
        txt_ids = torch.zeros(emb.prompt_embeds.shape[1], 3, device=self.device, dtype=emb.prompt_embeds.dtype)
        return self.transformer(hidden_states=tokens, timestep=timestep, guidance=guidance,
                                pooled_projections=emb.pooled, encoder_hidden_states=emb.prompt_embeds,
                                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 3.5,
                 true_cfg_scale: float | None = None) -> torch.Tensor:
        """Velocity prediction ``v(x, σ)`` (``v ≈ ε - x0``; Euler: ``x' = x + (σ_next - σ)·v``).

        Args:
            x: ``[B, C, h, w]`` unpacked latents at σ (``h, w`` even).
            sigma: ``[B]`` noise levels in [0, 1] (the transformer receives ``(σ·1000)/1000`` and scales it itself).
            cond: :class:`~flowrl.models.sd3.PromptEmbeds` of the B samples (from :meth:`encode`).
            guidance_scale: FLUX.1-dev's *embedded* guidance (default 3.5 as the pipeline), fed to the transformer's
                guidance embedding for every sample; ignored by checkpoints without one (schnell). Not CFG.
            true_cfg_scale: overrides the adapter's ``true_cfg_scale`` for this call; > 1 adds a second forward on
                :meth:`negative` and returns ``v_neg + s·(v_cond - v_neg)``.

        Returns:
            ``[B, C, h, w]`` float32 velocity (differentiable w.r.t. LoRA parameters when grad is enabled).
        """
        b, _c, h, w = x.shape
        if self._shift_tokens is not None and (h // 2) * (w // 2) != self._shift_tokens and not self._warned_shift:
            warnings.warn(f"FluxAdapter: latents of {(h // 2) * (w // 2)} image tokens but the last σ grid was "
                          f"shifted for {self._shift_tokens}; call sigmas(num_steps, height, width) for the sampled "
                          "size", stacklevel=2)
            self._warned_shift = True
        tokens = self.pack(x.to(self.dtype))
        img_ids = self.pipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        timestep = (sigma.to(self.device, torch.float32) * 1000).to(self.dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(guidance_scale), device=self.device, dtype=torch.float32)
        out = self._forward(tokens, timestep, guidance, cond, img_ids)
        scale = self.true_cfg_scale if true_cfg_scale is None else float(true_cfg_scale)
        if scale > 1.0:
            neg = self._forward(tokens, timestep, guidance, self.negative(b), img_ids)
            out = neg + scale * (out - neg)
        return self.unpack(out, h, w).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` unpacked latents → ``[B, 3, H, W]`` float32 images in [0, 1] (as the pipeline's
        postprocess)."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd: ``[B, C, h, w]`` latents → ``[B, 3, H, W]`` float32 images in [0, 1] whose
        gradients flow back to ``latents`` (the VAE's own weights are frozen). Used by differentiable-reward
        fine-tuning (DRaFT / ReFL, :mod:`flowrl.draft`)."""
        vae = self.pipeline.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # -- LoRA ----------------------------------------------------------------------------------------------------
    def save_lora(self, directory: str | os.PathLike) -> None:
        """Save the LoRA to ``directory`` (``pytorch_lora_weights.safetensors``, adapter config as metadata) so that
        ``FluxPipeline.load_lora_weights(directory)`` restores the same scale ``alpha / rank``."""
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer)
        meta = self.transformer.peft_config["default"].to_dict()
        FluxPipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=meta)
